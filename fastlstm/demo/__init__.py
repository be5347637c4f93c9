"""The training demo behind ``fastlstm train``: a character-level language model."""
