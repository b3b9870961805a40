"""`rain verify`: audit a merged model where it is, a local directory or a released S3 version (beside the release,
above both lineage and release, so neither imports the other back)."""

from __future__ import annotations

from pathlib import Path

from rain_tasks.audit.lineage import LineageReport, LocalFiles, audit
from rain_tasks.audit.release import S3Files
from rain_tasks.audit.signing import TrustConfig


def verify(target: str, project: str | Path | None = None, trust: TrustConfig | None = None,
           expected_digest: str | None = None, trust_s3_checksums: bool = False) -> LineageReport:
    """Audit a merged model directory, or a released model given as s3://bucket/prefix/NAME/VERSION, in place
    (see `audit`; `trust_s3_checksums` takes S3's stored checksums instead of downloading, rain_tasks.audit.release)."""
    if target.startswith("s3://"):
        return audit(S3Files.open(target, trust_checksums=trust_s3_checksums), project, trust, expected_digest)
    return audit(LocalFiles(Path(target)), project, trust, expected_digest)
