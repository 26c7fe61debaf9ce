"""Data: read conversations, render the chat template, tokenize with the label mask, collate."""
