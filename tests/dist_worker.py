"""Run an algorithm script's main() under torchrun and save this rank's LoRA weights for comparison."""
import importlib
import os
import sys

import torch
from peft.utils import get_peft_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts' folder
script, argv = sys.argv[1], sys.argv[2:]
module = importlib.import_module(script)
captured = {}
original = module.add_lora


def add_lora(unet, args):  # keep a handle on the UNet to read its LoRA after training
    captured["unet"] = unet
    return original(unet, args)


module.add_lora = add_lora
args = module.parse_args(argv)
module.main(args)
rank = int(os.environ["RANK"])
torch.save(get_peft_model_state_dict(captured["unet"]), os.path.join(args.output_dir, f"lora_rank{rank}.pt"))
