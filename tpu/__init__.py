"""Running on Cloud TPU VMs and pod slices, and on multi-host GPU clusters."""
