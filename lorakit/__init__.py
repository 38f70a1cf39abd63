"""
The machinery under the homework's five files (lora.py, model.py, dataloader.py, train.py,
generate.py): what train.py, generate.py, sweep.py and export.py need beyond the course's API.

    adapters       LoRA layers of a model found, merged, counted and saved, by the course's API alone
    variants       DoRA, PiSSA, LoRA on slices of c_attn (the solution only: not in the starter)
    checkpoint     train.py's ckpt.pt            hf_checkpoint  Hugging Face GPT-2 checkpoints and PEFT names
    common         device, precision, atomic writes, downloads
    distributed    DDP, FSDP, stop signals       runlog         metrics, steps, run.json, the loss plot, W&B

Nothing here imports a handout file's internals: of lora.py only LoRALinear and its methods
(is_lora, train, eval), so a student's lora.py written for the course's starter drops in whole.
"""
