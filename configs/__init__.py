"""Experiment configs: one `get_config(arg)` file each (`genjax train --config configs/NAME.py:ARG`).
Their shared default sections are the package module `configs.common`; `genjax.config.load_config`
puts the folder above a config package on `sys.path`, so `from configs import common` resolves."""
