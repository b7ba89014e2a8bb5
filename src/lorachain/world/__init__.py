"""The miniature world: a pretrained tiny text-to-image base, metric encoders trained on the same
world, and personalization concepts in the real datasets' layouts (see docs/world.md)."""
