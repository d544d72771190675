"""The tiny world: procedural captioned scenes of colored shapes, and a pixel check of generated images.

Every scene is a function of one integer seed. A scene has a background color, one or two shapes (circle,
square, triangle) of named colors, sizes and positions, and sometimes a light texture (noise or stripes) that
JPEG compression removes. Captions follow one grammar:

    a {color} {shape}[ on the {position}][ and a {color} {shape}[ on the {position}]] on a {color} background

A position word places the shape's center at that anchor (a few pixels of jitter); without one the shape is
anywhere inside the frame. The vocabulary is also written to `world.json` (colors with their RGB, shapes,
positions with their anchors, the resolution, the held-out color-shape pairs) so that other tools can make
prompts and check images without importing this file.

`check(image, caption)` reads a generated image back with pixel statistics only (no model): the background
is the color of the border, a shape's color is the palette color nearest to its pixels, its type is the
template (circle, square, triangle fitted to its bounding box) it overlaps best, its position the anchor
nearest to its centroid.

    python tiny_models/world.py --write_json          # tiny_models/world.json
    python tiny_models/world.py --show 16 out.png     # a grid of 16 scenes and their captions
    python tiny_models/world.py --read outputs/drtune-demo   # a demo's before/after grid, read back
"""

import argparse
import json
import os
import re

import numpy as np
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
RESOLUTION = 32
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 20), "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
# anchors as fractions of the image side (x, y)
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
# never drawn in training scenes; the evaluation tests generalization to them
HELD_OUT = (("purple", "triangle"), ("orange", "square"), ("green", "circle"), ("white", "triangle"))
POSITION_PROB, TWO_SHAPE_PROB, TEXTURE_PROB = 0.5, 0.3, 0.3
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges


def vocabulary():
    return dict(resolution=RESOLUTION, colors={k: list(v) for k, v in COLORS.items()}, shapes=list(SHAPES),
                positions={k: list(v) for k, v in POSITIONS.items()}, held_out=[list(p) for p in HELD_OUT],
                grammar="a {color} {shape}[ on the {position}][ and a {color} {shape}[ on the {position}]] "
                        "on a {color} background")


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------


def sample_scene(seed, held_out="exclude"):
    """A scene dict from a seed. held_out: 'exclude' (training), 'only' (every shape a held-out pair), 'any'."""
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    background = colors[rng.integers(len(colors))]
    n = 2 if rng.random() < TWO_SHAPE_PROB else 1
    with_positions = rng.random() < POSITION_PROB
    if not with_positions:
        positions = [None] * n
    elif n == 1:
        positions = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
    else:  # two shapes: opposite sides
        pair = [("left", "right"), ("top", "bottom")][rng.integers(2)]
        positions = list(pair) if rng.random() < 0.5 else list(pair[::-1])
    shapes, used = [], {background}
    for position in positions:
        while True:
            color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
            if color in used:
                continue
            if (held_out == "exclude" and (color, shape) in HELD_OUT) or \
                    (held_out == "only" and (color, shape) not in HELD_OUT):
                continue
            break
        used.add(color)
        size = rng.uniform(0.38, 0.55) if n == 1 else rng.uniform(0.28, 0.36)  # side of the bounding box
        shapes.append(dict(color=color, shape=shape, position=position, size=float(size)))
    _place(shapes, rng)
    texture = None
    if rng.random() < TEXTURE_PROB:
        texture = dict(kind=["noise", "stripes"][rng.integers(2)], seed=int(rng.integers(2 ** 31)),
                       amplitude=float(rng.uniform(0.06, 0.12)))
    return dict(background=background, shapes=shapes, texture=texture)


def _place(shapes, rng):
    """Centers (fractions of the side): at the anchor with jitter, or anywhere with the shapes apart."""
    for _ in range(100):
        for s in shapes:
            half = s["size"] / 2
            if s["position"] is not None:
                ax, ay = POSITIONS[s["position"]]
                s["x"], s["y"] = (float(np.clip(a + rng.uniform(-0.05, 0.05), half, 1 - half)) for a in (ax, ay))
            else:
                s["x"], s["y"] = (float(rng.uniform(half, 1 - half)) for _ in range(2))
        if len(shapes) == 1:
            return
        a, b = shapes
        if max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) > (a["size"] + b["size"]) / 2 + 0.02:
            return
    raise RuntimeError("could not place two shapes apart")  # unreachable with the sizes above


def caption(scene):
    parts = []
    for s in scene["shapes"]:
        part = f"a {s['color']} {s['shape']}"
        if s["position"] is not None:
            part += f" on the {s['position']}"
        parts.append(part)
    return " and ".join(parts) + f" on a {scene['background']} background"


def render(scene, resolution=RESOLUTION):
    """(resolution, resolution, 3) uint8."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for s in scene["shapes"]:
        cx, cy, r = s["x"] * big, s["y"] * big, s["size"] * big / 2
        fill = COLORS[s["color"]]
        if s["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:  # upright triangle filling its bounding box
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    array = np.asarray(image.resize((resolution, resolution), Image.BOX), dtype=np.float32)
    texture = scene.get("texture")
    if texture is not None:
        rng = np.random.default_rng(texture["seed"])
        if texture["kind"] == "noise":
            pattern = rng.standard_normal((resolution, resolution, 1))
        else:
            period = rng.integers(2, 5)
            pattern = np.where((np.arange(resolution) // period) % 2 == 0, 1.0, -1.0)[None, :, None]
            pattern = np.broadcast_to(pattern, (resolution, resolution, 1))
        array = array + 255 * texture["amplitude"] * pattern
    return np.clip(array.round(), 0, 255).astype(np.uint8)


def dataset(seeds, held_out="exclude", resolution=RESOLUTION):
    """(N, H, W, 3) uint8 images and their captions for the given seeds."""
    scenes = [sample_scene(int(s), held_out) for s in seeds]
    return np.stack([render(s, resolution) for s in scenes]), [caption(s) for s in scenes], scenes


# ---------------------------------------------------------------------------------------------------------
# The pixel check
# ---------------------------------------------------------------------------------------------------------

_CAPTION = re.compile(r"a (\w+) (\w+)(?: on the (\w+))?(?: and a (\w+) (\w+)(?: on the (\w+))?)? on a (\w+) background")


def parse(text):
    """Caption -> dict(background, shapes=[dict(color, shape, position)]), or None if off-grammar."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        return None
    g = m.groups()
    shapes = [dict(color=g[0], shape=g[1], position=g[2])]
    if g[3] is not None:
        shapes.append(dict(color=g[3], shape=g[4], position=g[5]))
    return dict(background=g[6], shapes=shapes)


def _nearest_color(pixels):
    """(N, 3) float -> index of the nearest palette color for each pixel."""
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    return ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)


def _templates(h, w):
    """Boolean masks (h, w) of the three shapes filling an h x w box."""
    y, x = (np.mgrid[0:h, 0:w] + 0.5)
    u, v = x / w, y / h  # in [0, 1]
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    square = np.ones((h, w), bool)
    triangle = np.abs(u - 0.5) <= v / 2  # apex at the top, base at the bottom
    return dict(circle=circle, square=square, triangle=triangle)


def _shape_type(mask):
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scores = {name: (crop & t).sum() / (crop | t).sum() for name, t in _templates(*crop.shape).items()}
    return max(scores, key=scores.get)


def _nearest_position(x, y):
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def _largest_component(mask):
    """The largest 4-connected region of a boolean mask."""
    h, w = mask.shape
    seen, best = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0], stack, region = True, [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        best = max(best, region, key=len)
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _read(image, target, min_pixels):
    """The pixel reading shared by check() and fields(): (background right, [(drawn, region mask)] per shape)."""
    image = np.asarray(image, dtype=np.float32)
    if image.max() <= 1.0:
        image = image * 255
    h, w, _ = image.shape
    min_pixels = max(1, round(min_pixels * h * w / RESOLUTION ** 2))  # the same share of the image at any size
    names = list(COLORS)
    labels = _nearest_color(image.reshape(-1, 3)).reshape(h, w)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(names)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[background] = 0
    top = [i for i in np.argsort(-counts, kind="stable")[: len(target["shapes"])] if counts[i] > 0]
    shapes = []
    for s in target["shapes"]:
        index = names.index(s["color"])
        region = _largest_component(labels == index)
        shapes.append((bool(index in top and region.sum() >= min_pixels), region))
    return names[background] == target["background"], shapes


def _placed(region, position):
    h, w = region.shape
    ys, xs = np.nonzero(region)
    return _nearest_position((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h) == position


def check(image, text, min_pixels=20):
    """Read an image back against its caption. image: (H, W, 3) uint8, or float in [0, 1].
    Every pixel takes the nearest palette color; the background is the most common color of the border. A shape
    counts as drawn when its color is among the most common non-background colors (the first for one shape, the
    first two for two) and its largest connected region has at least min_pixels pixels at 32 px (a shape of the
    world has 40 or more; the same share of the image at other sizes). Returns booleans, None where the caption
    does not ask: background; color (one-shape prompts); shape (one-shape prompts: the template, fitted to the
    region's bounding box, that overlaps it best); position (every position word: the anchor nearest to the
    region's centroid); colors_pair (two-shape prompts: both colors drawn)."""
    target = parse(text)
    if target is None:
        raise ValueError(f"not a caption of the world: {text!r}")
    background, shapes = _read(image, target, min_pixels)
    result = dict(background=background, color=None, shape=None, position=None, colors_pair=None)
    for s, (found, region) in zip(target["shapes"], shapes):
        if s["position"] is not None:
            ok = found and _placed(region, s["position"])
            result["position"] = ok if result["position"] is None else result["position"] and ok
    if len(target["shapes"]) == 1:
        found, region = shapes[0]
        result["color"] = found
        result["shape"] = found and _shape_type(region) == target["shapes"][0]["shape"]
    else:
        result["colors_pair"] = all(found for found, _ in shapes)
    return result


def fields(image, text, min_pixels=20):
    """GenEval in miniature: every field the caption asks for, read back as in check(), one boolean each:
    background; then per shape (first, second) its color drawn, its type (the best-fitting template of its region),
    and its position word if it has one. A shape not drawn gets its type and position wrong."""
    target = parse(text)
    if target is None:
        raise ValueError(f"not a caption of the world: {text!r}")
    background, shapes = _read(image, target, min_pixels)
    out = dict(background=background)
    for i, (s, (found, region)) in enumerate(zip(target["shapes"], shapes)):
        out[f"color_{i}"] = found
        out[f"shape_{i}"] = found and _shape_type(region) == s["shape"]
        if s["position"] is not None:
            out[f"position_{i}"] = found and _placed(region, s["position"])
    return out


def reward(images, prompts):
    """The world's pixel checker as a reward (a plug-in: --reward tiny_models/world.py:reward): the fraction of the
    caption's fields (fields()) that each image draws right; images (B, 3, H, W) in [0, 1], one score per image."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().permute(0, 2, 3, 1).cpu().numpy()
    return np.array([np.mean(list(fields(image, prompt).values())) for image, prompt in zip(pixels, prompts)],
                    dtype=np.float32)


reward.differentiable = False  # pixel counting: no gradient; for grpo.py, dpo.py --online and spo.py


def placement(images, prompts):
    """GenEval's position task in miniature, as a reward (--reward tiny_models/world.py:placement): the fraction of
    the caption's position words whose shape is drawn with its centroid nearest that word's anchor; 1 for a
    caption without position words. images (B, 3, H, W) in [0, 1], one score per image."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().permute(0, 2, 3, 1).cpu().numpy()
    scores = []
    for image, prompt in zip(pixels, prompts):
        read = [v for k, v in fields(image, prompt).items() if k.startswith("position")]
        scores.append(np.mean(read) if read else 1.0)
    return np.array(scores, dtype=np.float32)


placement.differentiable = False


def position_prompts(num, seed):
    """num distinct captions of two shapes, each with a position word: colors and shapes as the world's scenes draw
    them, the two words any two different sides (left, right, top, bottom; not only the opposite pairs the training
    scenes have, so "on the left ... on the top" too): GenEval's "position" task in miniature, where the world puts
    the first-named shape on the left or top whatever the words say."""
    rng, colors, sides, out = np.random.default_rng(seed), list(COLORS), ["left", "right", "top", "bottom"], []
    while len(out) < num:
        background, first, second = (colors[i] for i in rng.choice(len(colors), 3, replace=False))
        shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=2)]
        if (first, shapes[0]) in HELD_OUT or (second, shapes[1]) in HELD_OUT:
            continue
        a, b = (sides[i] for i in rng.choice(4, 2, replace=False))
        text = f"a {first} {shapes[0]} on the {a} and a {second} {shapes[1]} on the {b} on a {background} background"
        if text not in out:
            out.append(text)
    return out


def opposite_sides(text):
    """Whether a caption's two position words are opposite sides (left and right, top and bottom)."""
    words = {s["position"] for s in parse(text)["shapes"]}
    return words in ({"left", "right"}, {"top", "bottom"})


def demo_prompts():
    """(train, eval) prompt lists of the demos: 256 captions of training scenes, and 8 held-out captions for the
    evaluation grid (four single shapes, two with a position word, two pairs of shapes)."""
    train = [caption(sample_scene(seed)) for seed in range(256)]
    held = [caption(sample_scene(seed, held_out="any")) for seed in range(10**8, 10**8 + 200)]
    kinds = [(False, False)] * 4 + [(False, True)] * 2 + [(True, None)] * 2  # (two shapes, position word)
    chosen = []
    for two, position in kinds:
        chosen.append(next(c for c in held if c not in chosen and (" and " in c) == two
                           and (position is None or (" on the " in c) == position)))
    return train, chosen


def symmetry_error(image):
    """The DRTune paper's eq. 6 on one image, computed here with numpy: mean |x - mirror(x)| / std(x), x in [0, 1]
    (H, W, 3); 0 for a mirror-symmetric image."""
    x = np.asarray(image, dtype=np.float64)
    x = x / 255 if x.max() > 1 else x
    return float(np.abs(x - x[:, ::-1]).mean() / np.sqrt(x.var() + 1e-6))


def drawn(result):
    """Whether a check() result still shows what the prompt asks for, position and type aside (a symmetry reward
    may move and reshape a shape): the background color, and every shape's color."""
    return bool(result["background"] and (result["color"] if result["colors_pair"] is None else result["colors_pair"]))


def split_grid(path, n):
    """The 2 n images of a before/after grid as the scripts save it (samples/before_after.png: the n "before"
    images, then the n "after" ones, row-major in two rows): (before, after), lists of (H, W, 3) uint8."""
    with Image.open(path) as image:
        grid = np.asarray(image.convert("RGB"))
    h, w = grid.shape[0] // 2, grid.shape[1] // n
    tiles = [grid[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(n)]
    return tiles[:n], tiles[n:]


def read_grid(path, prompts):
    """A before/after grid against its prompts: per image, eq. 6 symmetry error and drawn(check()); returns
    dict(before=..., after=...) of dict(symmetry=[...], drawn=[...], checks=[...])."""
    out = {}
    for name, images in zip(("before", "after"), split_grid(path, len(prompts))):
        checks = [check(image, prompt) for image, prompt in zip(images, prompts)]
        out[name] = dict(symmetry=[symmetry_error(image) for image in images], drawn=[drawn(c) for c in checks],
                         checks=checks)
    return out


def read_run(output_dir):
    """read_grid of a training run's samples/before_after.png, with the first --num_eval_prompts prompts of the
    .txt file its config.json names as --eval_prompts (the world demos' tiny_models/world-eval-prompts.txt)."""
    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    path = config.get("eval_prompts")
    if not (path and path.endswith(".txt") and os.path.isfile(path)):
        raise ValueError(f"{output_dir}: its --eval_prompts ({path}) is not a .txt file of world captions")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    prompts = prompts[: config.get("num_eval_prompts") or len(prompts)]
    return read_grid(os.path.join(output_dir, "samples", "before_after.png"), prompts), prompts


def write_json(path=os.path.join(HERE, "world.json")):
    with open(path, "w") as f:
        json.dump(vocabulary(), f, indent=2)
        f.write("\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write_json", action="store_true",
                        help="write tiny_models/world.json and the demos' world-train-prompts.txt, world-eval-prompts.txt")
    parser.add_argument("--show", nargs=2, metavar=("N", "PNG"), help="save a grid of N scenes, print captions")
    parser.add_argument("--enlarge", nargs=2, metavar=("SRC", "DST"),
                        help="copy a grid of 32 px images 4x larger, pixels kept sharp (the README's gallery)")
    parser.add_argument("--read", metavar="OUTPUT_DIR",
                        help="read a run's samples/before_after.png back: eq. 6 symmetry error and whether each "
                             "prompt is still drawn, before and after")
    args = parser.parse_args()
    if args.read:
        result, prompts = read_run(args.read)
        for i, prompt in enumerate(prompts):
            b, a = result["before"], result["after"]
            print(f"{b['symmetry'][i]:.3f} -> {a['symmetry'][i]:.3f}  drawn {b['drawn'][i]:d} -> {a['drawn'][i]:d}  "
                  f"{prompt}")
        for name in ("before", "after"):
            r = result[name]
            print(f"{name}: mean symmetry error {np.mean(r['symmetry']):.3f}, drawn {sum(r['drawn'])}/{len(prompts)}")
    if args.write_json:
        print(write_json())
        # grpo.py's demo: 40 held-out captions of two shapes with any two different position words, and 256 training
        # captions whose words are opposite sides, the only two-shape layouts of the world's scenes: group-relative RL
        # can only reinforce layouts the model samples, and it never draws the others (benchmarks/grpo_world.py)
        held = [p for p in position_prompts(80, 1) if p not in position_prompts(256, 0)][:40]
        train = [p for p in position_prompts(3000, 5) if opposite_sides(p) and p not in held][:256]
        files = dict(zip(("world-train-prompts.txt", "world-eval-prompts.txt"), demo_prompts()))
        files.update({"world-position-train-prompts.txt": train, "world-position-eval-prompts.txt": held})
        for name, prompts in files.items():
            with open(os.path.join(HERE, name), "w") as f:
                f.write("\n".join(prompts) + "\n")
    if args.enlarge:
        with Image.open(args.enlarge[0]) as image:
            image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(args.enlarge[1])
    if args.show:
        n, path = int(args.show[0]), args.show[1]
        images, captions, _ = dataset(range(n))
        cols = int(np.ceil(np.sqrt(n)))
        grid = np.full((cols * RESOLUTION, cols * RESOLUTION, 3), 128, np.uint8)
        for i, image in enumerate(images):
            r, c = divmod(i, cols)
            grid[r * RESOLUTION:(r + 1) * RESOLUTION, c * RESOLUTION:(c + 1) * RESOLUTION] = image
        Image.fromarray(grid).resize((cols * 128, cols * 128), Image.NEAREST).save(path)
        print("\n".join(captions))
