"""Objectives and training loops: SFT, DPO and GRPO on dialogue-game play."""
