"""The fetch stage: one hub model, pinned to a commit and checked before its weights are downloaded."""
