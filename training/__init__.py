"""training: plain-PyTorch teacher-student training (imports flare_infer, never the reverse)."""
