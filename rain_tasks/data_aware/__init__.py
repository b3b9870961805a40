"""Data-aware merge methods' inputs: statistics and masks computed by running models on calibration data (AIM's
anchor statistic, ReasonAny's gradient scores and masks); the merge rules they feed are in rain_tasks.methods."""
