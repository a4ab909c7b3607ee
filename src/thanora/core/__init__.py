"""The method's numerics, shared by ThanoRA and CorDA: which weights are adapted (`targets`), calibration statistics
(`covariance`), task-aware spectra (`spectra`), spectral-entropy rank allocation (`allocation`), HASI factors
(`initialize`), the SPR regulariser and block overlap (`regularizers`) and ThanoRA's settings (`hasi_config`).

Pure tensor code and read-only model hooks: nothing here changes a model or knows about PEFT. Imports nothing above
itself (only `thanora.artifacts` for the spectra cache and rank-plan files).
"""
