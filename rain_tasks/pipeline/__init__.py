"""The pipeline core: the stage registry (which writes dvc.yaml), input validation, planning, run records, DVC state."""
