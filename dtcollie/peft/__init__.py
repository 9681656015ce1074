"""Parameter-efficient fine-tuning: LoRA adapters, their tensor-parallel layout, PEFT-format export."""

from dtcollie.peft.export import (export_lora, load_lora_config, peft_adapter_tensors, save_lora_config,
                                  save_peft_adapter, write_peft_adapter)
from dtcollie.peft.lora import (TARGETS, LoRAConfig, LoRALinear, apply_lora, check_lora_config, init_lora,
                                is_lora_key, lora_config, merge_lora, merge_lora_state_dict)

__all__ = ["TARGETS", "LoRAConfig", "LoRALinear", "apply_lora", "check_lora_config", "export_lora", "init_lora",
           "is_lora_key", "load_lora_config", "lora_config", "merge_lora", "merge_lora_state_dict",
           "peft_adapter_tensors", "save_lora_config", "save_peft_adapter", "write_peft_adapter"]
