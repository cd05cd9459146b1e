"""The CNN in PyTorch: an nn.Module whose state_dict is exactly the canonical parameter dict."""
