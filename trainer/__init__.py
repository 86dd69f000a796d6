"""The lean trainer (stage I on cached filtered masks, stage II self-training): see the trainer issue."""
