"""Run an algorithm script's main() under torchrun and save this rank's LoRA weights (--finetune full: the denoiser's
weights, as this rank holds them gathered after the last update) for comparison."""
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
    captured["params"] = original(unet, args)
    return captured["params"]


module.add_lora = add_lora
kill = os.environ.get("DIST_WORKER_KILL")  # a checkpoint folder name: rank 0 is SIGKILLed as it renames it into place
if kill and os.environ["RANK"] == "0":
    import signal
    replace = os.replace

    def replace_or_die(src, dst):
        if str(dst).endswith(os.sep + kill) and str(src).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    os.replace = replace_or_die
args = module.parse_args(argv)
module.main(args)
rank = int(os.environ["RANK"])
weights = (get_peft_model_state_dict(captured["unet"]) if args.finetune == "lora" else
           {name: p.detach().clone() for name, p in captured["unet"].named_parameters()})
torch.save(weights, os.path.join(args.output_dir, f"lora_rank{rank}.pt"))
if args.finetune == "full":  # how the denoiser was held: FSDP2 modules and the optimizer's parameters
    import json
    with open(os.path.join(args.output_dir, f"sharding_rank{rank}.json"), "w") as f:
        json.dump(dict(fsdp_modules=len(module.fsdp_parts(captured["unet"])),
                       parameter_type=type(captured["params"][0]).__name__), f)
