"""The paper's recipes on top of the library: ICL data and prompts (`icl`), the method's settings (`settings`),
model loading (`models`), training with transformers' Trainer (`training`), evaluation (`evaluation`), contextual
calibration (`calibration`), the commands (`workflow`, `suite`, `cli`: `abft demo/train/eval/export/suite/bench`).

The library (`abft_kernels.ops`, `abft_kernels.hf`, `abft_kernels.loss`, `abft_kernels.forward`,
`abft_kernels.export`) imports nothing from here: `import abft_kernels` loads no dataset code.
"""
