"""Fine-tuning reasoning models on a built dataset: settings, data reading, training
chat templates and the engine (TRL's SFT and DPO trainers over peft and accelerate)."""
