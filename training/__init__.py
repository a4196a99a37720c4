"""training: plain-PyTorch teacher-student training (imports flare_infer, never the reverse)."""

from training.cli import install_missing_extra_hook

install_missing_extra_hook()  # before any CLI module imports torch: one line, not a traceback, without the extra
