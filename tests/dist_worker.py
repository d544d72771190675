"""Run an algorithm script's main() under torchrun and save this rank's LoRA weights (--finetune full: the denoiser's
weights, gathered whole from the shards at the end of training) for comparison; with --finetune full also how the
denoiser was held (sharding_rank{rank}.json: FSDP modules, the optimizer's parameter type, this rank's fraction of
the weights, its denoiser calls and FSDP's all-gathers)."""
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
gathers = []  # FSDP2's all-gathers of weights (one per sharded block and call): counted, then run
all_gather = torch.distributed.all_gather_single


def counted_all_gather(*a, **k):
    gathers.append(1)
    return all_gather(*a, **k)


torch.distributed.all_gather_single = counted_all_gather
calls = [0]  # the denoiser's forward calls on this rank


def count_calls(*_):
    calls[0] += 1


original_train_full = module.train_full


def train_full(unet, args):  # count the sharded denoiser's calls (registered before FSDP's own hooks)
    unet.register_forward_pre_hook(count_calls)
    return original_train_full(unet, args)


module.train_full = train_full
original_save_denoiser = module.save_denoiser


def save_denoiser(accelerator, unet, *rest):  # every rank's copy of the trained weights, gathered whole
    captured["full"] = {name: p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                        for name, p in unet.named_parameters()}
    return original_save_denoiser(accelerator, unet, *rest)


module.save_denoiser = save_denoiser
args = module.parse_args(argv)
module.main(args)
rank = int(os.environ["RANK"])
weights = get_peft_model_state_dict(captured["unet"]) if args.finetune == "lora" else captured["full"]
torch.save(weights, os.path.join(args.output_dir, f"lora_rank{rank}.pt"))
if args.finetune == "full":  # how the denoiser was held: FSDP2 modules and the optimizer's parameters
    import json
    with open(os.path.join(args.output_dir, f"sharding_rank{rank}.json"), "w") as f:
        params = captured["params"]
        json.dump(dict(fsdp_modules=len(module.fsdp_parts(captured["unet"])),
                       parameter_type=type(params[0]).__name__, calls=calls[0], all_gathers=len(gathers),
                       local_fraction=sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)), f)
