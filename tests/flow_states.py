"""Run the rain_merge flow on a project and print how its task runs ended (used by test_pipeline)."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.rain_merge import rain_merge


async def _task_states(flow_run_id) -> Counter:
    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return Counter(r.state.name for r in runs)


def main(project: str) -> None:
    state = rain_merge(project_dir=project, return_state=True)
    assert state.is_completed(), state
    states = asyncio.run(_task_states(state.state_details.flow_run_id))
    print(f"cached={states.get('Cached', 0)} completed={states.get('Completed', 0)} all={dict(states)}")


if __name__ == "__main__":
    main(sys.argv[1])
