"""Generator tuning (RAFT data, LoRA/QLoRA SFT, DPO): arrives with the generator half."""
