"""The run: config and presets, the config → library wiring (`build`), launch, checkpoints, metrics and progress."""
