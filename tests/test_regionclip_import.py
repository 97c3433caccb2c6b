"""Importing RegionCLIP's released files (regionclip.zoo), checked against detectron2-style
reference forwards written here from the raw state dicts with plain torch ops.

Files are built with RegionCLIP's exact key layout from random tensors (a tiny-width CLIP;
full-size R50 RPNs on small images). Nothing is downloaded.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.ops import batched_nms, box_iou

from regionclip import zoo
from regionclip.box_head import BoxRefiner
from regionclip.build import CHECKPOINT_FORMAT
from regionclip.scoring import region_logits, regionclip_scores
from regionclip.text import RegionCLIPTextEncoder
from regionclip.config import ModelConfig, ProposalConfig, load_config
from regionclip.errors import BadConfig, BadInput, WeightsUnavailable
from regionclip.weights import register_clip_config

TINY = "test-rcimport-rn"  # a RegionCLIP-like CLIP ResNet, QuickGELU as OpenAI's
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
register_clip_config(TINY, TINY_CFG)
register_clip_config(TINY + "-gelu", {k: v for k, v in TINY_CFG.items() if k != "quick_gelu"})

CAFFE_MEAN_BGR = torch.tensor([103.530, 116.280, 123.675])


class _TrainerState:  # stands for the pickled objects some training checkpoints carry
    pass


# --------------------------------------------------------------------- RegionCLIP-layout files
def _clip_state(width=8, layers=(1, 1, 1, 1), embed=32, grid=2, text_width=16, text_layers=1,
                ctx=77, vocab=49408, seed=0, device="cpu") -> dict:
    """Keys and shapes of RegionCLIP's PretrainFastRCNN: ``backbone.*`` (detectron2 ModifiedResNet,
    FrozenBN buffers) and ``lang_encoder.*`` (CLIPLangEncoder), plus teacher/offline copies."""
    g = torch.Generator().manual_seed(seed)
    meta = device == "meta"
    s = {}

    def rnd(*shape, std=1.0, mean=0.0):
        if meta:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * std + mean

    def conv(name, cout, cin, k):
        s[name + ".weight"] = rnd(cout, cin, k, k, std=math.sqrt(2 / (cin * k * k)))

    def frozen_bn(name, c, gain=1.0):
        s[name + ".weight"] = rnd(c, std=0.1, mean=gain)
        s[name + ".bias"] = rnd(c, std=0.1)
        s[name + ".running_mean"] = rnd(c, std=0.1)
        s[name + ".running_var"] = rnd(c).abs() * 0.5 + 0.5 if not meta else rnd(c)

    p = "backbone."
    conv(p + "conv1", width // 2, 3, 3), frozen_bn(p + "bn1", width // 2)
    conv(p + "conv2", width // 2, width // 2, 3), frozen_bn(p + "bn2", width // 2)
    conv(p + "conv3", width, width // 2, 3), frozen_bn(p + "bn3", width)
    inplanes = width
    for i, (n, planes) in enumerate(zip(layers, [width, 2 * width, 4 * width, 8 * width]), start=1):
        for b in range(n):
            q = f"{p}layer{i}.{b}"
            conv(q + ".conv1", planes, inplanes, 1), frozen_bn(q + ".bn1", planes)
            conv(q + ".conv2", planes, planes, 3), frozen_bn(q + ".bn2", planes)
            conv(q + ".conv3", planes * 4, planes, 1), frozen_bn(q + ".bn3", planes * 4, gain=0.3)
            if b == 0:  # stride 2, or inplanes != planes * 4 in layer1
                conv(q + ".downsample.0", planes * 4, inplanes, 1), frozen_bn(q + ".downsample.1", planes * 4)
            inplanes = planes * 4
    c = width * 32
    s[p + "attnpool.positional_embedding"] = rnd(grid * grid + 1, c, std=c ** -0.5)
    for n in "qkv":
        s[f"{p}attnpool.{n}_proj.weight"] = rnd(c, c, std=c ** -0.5)
        s[f"{p}attnpool.{n}_proj.bias"] = rnd(c, std=0.02)
    s[p + "attnpool.c_proj.weight"] = rnd(embed, c, std=c ** -0.5)
    s[p + "attnpool.c_proj.bias"] = rnd(embed, std=0.02)

    t, w = "lang_encoder.", text_width
    s[t + "token_embedding.weight"] = rnd(vocab, w, std=0.02)
    s[t + "positional_embedding"] = rnd(ctx, w, std=0.01)
    for i in range(text_layers):
        r = f"{t}transformer.resblocks.{i}."
        s[r + "attn.in_proj_weight"] = rnd(3 * w, w, std=w ** -0.5)
        s[r + "attn.in_proj_bias"] = rnd(3 * w, std=0.02)
        s[r + "attn.out_proj.weight"] = rnd(w, w, std=w ** -0.5)
        s[r + "attn.out_proj.bias"] = rnd(w, std=0.02)
        for ln in ("ln_1", "ln_2"):
            s[r + ln + ".weight"], s[r + ln + ".bias"] = rnd(w, std=0.1, mean=1.0), rnd(w, std=0.1)
        s[r + "mlp.c_fc.weight"], s[r + "mlp.c_fc.bias"] = rnd(4 * w, w, std=w ** -0.5), rnd(4 * w, std=0.02)
        s[r + "mlp.c_proj.weight"] = rnd(w, 4 * w, std=(4 * w) ** -0.5)
        s[r + "mlp.c_proj.bias"] = rnd(w, std=0.02)
    s[t + "ln_final.weight"], s[t + "ln_final.bias"] = rnd(w, std=0.1, mean=1.0), rnd(w, std=0.1)
    s[t + "text_projection"] = rnd(w, embed, std=w ** -0.5)
    # Copies RegionCLIP files carry and the importer must ignore.
    s["teacher_backbone.conv1.weight"] = rnd(width // 2, 3, 3, 3)
    s["teacher_backbone.attnpool.c_proj.weight"] = rnd(embed, c)
    return s


def _finetuned(state: dict, classes=48, embed=32, seed=1) -> dict:
    """A fine-tuned CLIPFastRCNN file: no text tower, a class-agnostic box predictor."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in state.items() if not k.startswith(("lang_encoder.", "teacher_backbone."))}
    out["roi_heads.box_predictor.cls_score.weight"] = torch.randn(classes, embed, generator=g)
    out["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, embed)
    out["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(4, embed, generator=g) * 0.05
    out["roi_heads.box_predictor.bbox_pred.bias"] = torch.randn(4, generator=g) * 0.05
    return out


def _rpn_state(layout: str, seed=0, prefix="") -> dict:
    """detectron2 R50-FPN (rpn_lvis_866) or R50-C4 (rpn_coco_48) keys: MSRA ResNet with FrozenBN
    (``conv*.norm.*``, ``shortcut``), FPN laterals/outputs, StandardRPNHead; plus roi_heads junk."""
    g = torch.Generator().manual_seed(seed)
    s = {}
    fpn = layout == "fpn"
    body = prefix + ("backbone.bottom_up." if fpn else "backbone.")

    def conv(name, cout, cin, k, bias=False, std=None):
        s[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (std or math.sqrt(2 / (cin * k * k)))
        if bias:
            s[name + ".bias"] = torch.randn(cout, generator=g) * 0.1

    def norm(name, c, gain=1.0, var=1.0):
        s[name + ".weight"] = (torch.rand(c, generator=g) * 0.5 + 0.75) * gain
        s[name + ".bias"] = torch.randn(c, generator=g) * 0.1
        s[name + ".running_mean"] = torch.randn(c, generator=g) * 0.1 * math.sqrt(var)
        s[name + ".running_var"] = (torch.rand(c, generator=g) + 0.5) * var

    conv(body + "stem.conv1", 64, 3, 7), norm(body + "stem.conv1.norm", 64, var=1.5e4)
    inc = 64
    for i, n in enumerate([3, 4, 6, 3] if fpn else [3, 4, 6]):
        stage, mid, out = i + 2, 64 * 2 ** i, 256 * 2 ** i
        for b in range(n):
            q = f"{body}res{stage}.{b}"
            if b == 0:
                conv(q + ".shortcut", out, inc, 1), norm(q + ".shortcut.norm", out)
            conv(q + ".conv1", mid, inc if b == 0 else out, 1), norm(q + ".conv1.norm", mid)
            conv(q + ".conv2", mid, mid, 3), norm(q + ".conv2.norm", mid)
            conv(q + ".conv3", out, mid, 1), norm(q + ".conv3.norm", out, gain=0.3)
        inc = out
    if fpn:
        for stage, c in zip([2, 3, 4, 5], [256, 512, 1024, 2048]):
            conv(f"{prefix}backbone.fpn_lateral{stage}", 256, c, 1, bias=True)
            conv(f"{prefix}backbone.fpn_output{stage}", 256, 256, 3, bias=True, std=math.sqrt(1 / (9 * 256)))
    c, a = (256, 3) if fpn else (1024, 15)
    h = prefix + "proposal_generator.rpn_head."
    conv(h + "conv", c, c, 3, bias=True)
    conv(h + "objectness_logits", a, c, 1, bias=True, std=1.5 / math.sqrt(c))
    conv(h + "anchor_deltas", 4 * a, c, 1, bias=True, std=0.2 / math.sqrt(c))
    s[prefix + "roi_heads.box_predictor.cls_score.weight"] = torch.zeros(867, 8)  # Mask R-CNN heads: ignored
    return s


# ------------------------------------------------------------- detectron2-style reference forwards
def _frozen_bn(s, p, x):
    scale = s[p + ".weight"] / torch.sqrt(s[p + ".running_var"] + 1e-5)
    return (x - s[p + ".running_mean"][:, None, None]) * scale[:, None, None] + s[p + ".bias"][:, None, None]


def ref_image_tower(s: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """RegionCLIP's ModifiedResNet (clip_backbone.py) + AttentionPool2d from ``backbone.*``."""
    p = "backbone."

    def cbr(x, c, b, stride=1, pad=0, relu=True):
        y = _frozen_bn(s, b, F.conv2d(x, s[c + ".weight"], stride=stride, padding=pad))
        return F.relu(y) if relu else y

    x = cbr(x, p + "conv1", p + "bn1", 2, 1)
    x = cbr(x, p + "conv2", p + "bn2", 1, 1)
    x = F.avg_pool2d(cbr(x, p + "conv3", p + "bn3", 1, 1), 2)
    for i in range(1, 5):
        b = 0
        while f"{p}layer{i}.{b}.conv1.weight" in s:
            q, stride = f"{p}layer{i}.{b}", (2 if i > 1 and b == 0 else 1)
            y = cbr(cbr(x, q + ".conv1", q + ".bn1"), q + ".conv2", q + ".bn2", 1, 1)
            y = F.avg_pool2d(y, stride) if stride > 1 else y  # anti-aliased stride after the 3x3
            y = cbr(y, q + ".conv3", q + ".bn3", relu=False)
            short = x
            if q + ".downsample.0.weight" in s:
                short = cbr(F.avg_pool2d(x, stride), q + ".downsample.0", q + ".downsample.1", relu=False)
            x, b = F.relu(y + short), b + 1
    tokens = x.flatten(2).transpose(1, 2)  # N, HW, C
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + s[p + "attnpool.positional_embedding"]
    n, length, c = tokens.shape
    a = p + "attnpool."
    q = (tokens[:, :1] @ s[a + "q_proj.weight"].T + s[a + "q_proj.bias"]).view(n, 1, heads, -1).transpose(1, 2)
    k = (tokens @ s[a + "k_proj.weight"].T + s[a + "k_proj.bias"]).view(n, length, heads, -1).transpose(1, 2)
    v = (tokens @ s[a + "v_proj.weight"].T + s[a + "v_proj.bias"]).view(n, length, heads, -1).transpose(1, 2)
    att = (q @ k.transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)
    out = (att @ v).transpose(1, 2).reshape(n, c)
    return out @ s[a + "c_proj.weight"].T + s[a + "c_proj.bias"]


def ref_text_tower(s: dict, tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """RegionCLIP's CLIPLangEncoder.encode_text (causal attention, QuickGELU, EOT token)."""
    t = "lang_encoder."
    x = s[t + "token_embedding.weight"][tokens] + s[t + "positional_embedding"]
    n, length, w = x.shape
    mask = torch.full((length, length), float("-inf")).triu(1)

    def ln(x, name):
        return F.layer_norm(x, (w,), s[name + ".weight"], s[name + ".bias"], 1e-5)

    i = 0
    while f"{t}transformer.resblocks.{i}.ln_1.weight" in s:
        r = f"{t}transformer.resblocks.{i}."
        qkv = ln(x, r + "ln_1") @ s[r + "attn.in_proj_weight"].T + s[r + "attn.in_proj_bias"]
        q, k, v = (z.view(n, length, heads, -1).transpose(1, 2) for z in qkv.split(w, dim=-1))
        att = (q @ k.transpose(-1, -2) / math.sqrt(w // heads) + mask).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(n, length, w)
        x = x + o @ s[r + "attn.out_proj.weight"].T + s[r + "attn.out_proj.bias"]
        h = ln(x, r + "ln_2") @ s[r + "mlp.c_fc.weight"].T + s[r + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ s[r + "mlp.c_proj.weight"].T + s[r + "mlp.c_proj.bias"]
        i += 1
    x = ln(x, t + "ln_final")
    return x[torch.arange(n), tokens.argmax(-1)] @ s[t + "text_projection"]


def _d2_resize(h, w, short, longest):
    """detectron2 ResizeShortestEdge.get_transform (augmentation_impl.py)."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > longest:
        f = longest / max(nh, nw)
        nh, nw = nh * f, nw * f
    return int(nh + 0.5), int(nw + 0.5)


def ref_proposals(s: dict, image: torch.Tensor, layout: str, short: int, longest: int, nms: float,
                  pre: int, post: int) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's RPN inference (rpn.py, proposal_utils.find_top_rpn_proposals, anchor_generator.py)
    from the raw file: RGB [0, 1] image -> (boxes in original pixels, objectness logits)."""
    fpn = layout == "fpn"
    h, w = image.shape[-2:]
    nh, nw = _d2_resize(h, w, short, longest)
    x = F.interpolate(image[None] * 255, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = x[:, [2, 1, 0]] - CAFFE_MEAN_BGR[:, None, None]  # BGR, caffe mean, std 1
    div = 32 if fpn else 1  # FPN size_divisibility; ResNet (C4) has none
    x = F.pad(x, (0, -nw % div, 0, -nh % div))
    body = "backbone.bottom_up." if fpn else "backbone."

    def cn(x, name, stride=1, pad=0, relu=True):
        y = F.conv2d(x, s[name + ".weight"], s.get(name + ".bias"), stride=stride, padding=pad)
        if name + ".norm.weight" in s:
            y = _frozen_bn(s, name + ".norm", y)
        return F.relu(y) if relu else y

    x = F.max_pool2d(cn(x, body + "stem.conv1", 2, 3), 3, 2, 1)
    feats = {}
    for stage in range(2, 6 if fpn else 5):
        b = 0
        while f"{body}res{stage}.{b}.conv1.weight" in s:
            q, stride = f"{body}res{stage}.{b}", (2 if stage > 2 and b == 0 else 1)
            short_cut = cn(x, q + ".shortcut", stride, relu=False) if q + ".shortcut.weight" in s else x
            y = cn(x, q + ".conv1", stride)  # STRIDE_IN_1X1
            y = cn(cn(y, q + ".conv2", 1, 1), q + ".conv3", relu=False)
            x, b = F.relu(y + short_cut), b + 1
        feats[stage] = x
    if fpn:
        prev, outs = None, {}
        for stage in (5, 4, 3, 2):
            lat = cn(feats[stage], f"backbone.fpn_lateral{stage}", relu=False)
            prev = lat if prev is None else lat + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            outs[stage] = cn(prev, f"backbone.fpn_output{stage}", 1, 1, relu=False)
        levels = [outs[2], outs[3], outs[4], outs[5], F.max_pool2d(outs[5], 1, 2, 0)]
        sizes, strides = [[32], [64], [128], [256], [512]], [4, 8, 16, 32, 64]
    else:
        levels, sizes, strides = [feats[4]], [[32, 64, 128, 256, 512]], [16]
    hd = "proposal_generator.rpn_head."
    all_boxes, all_logits, all_lvl = [], [], []
    for lvl, (f, sz, st) in enumerate(zip(levels, sizes, strides)):
        t = cn(f, hd + "conv", 1, 1)
        logits = F.conv2d(t, s[hd + "objectness_logits.weight"], s[hd + "objectness_logits.bias"])
        deltas = F.conv2d(t, s[hd + "anchor_deltas.weight"], s[hd + "anchor_deltas.bias"])
        gh, gw = f.shape[-2:]
        logits = logits.permute(0, 2, 3, 1).flatten()
        deltas = deltas.view(1, -1, 4, gh, gw).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        cells = []
        for size in sz:  # size-major, unrounded (DefaultAnchorGenerator.generate_cell_anchors)
            for ratio in (0.5, 1.0, 2.0):
                aw = math.sqrt(size ** 2 / ratio)
                cells.append([-aw / 2, -ratio * aw / 2, aw / 2, ratio * aw / 2])
        sy, sx = torch.meshgrid(torch.arange(0, gh * st, st, dtype=torch.float32),
                                torch.arange(0, gw * st, st, dtype=torch.float32), indexing="ij")
        shifts = torch.stack([sx.flatten(), sy.flatten(), sx.flatten(), sy.flatten()], 1)
        anchors = (shifts[:, None] + torch.tensor(cells)[None]).reshape(-1, 4)
        aw_, ah_ = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        cx, cy = anchors[:, 0] + 0.5 * aw_, anchors[:, 1] + 0.5 * ah_
        dw, dh = deltas[:, 2].clamp(max=math.log(1000 / 16)), deltas[:, 3].clamp(max=math.log(1000 / 16))
        pcx, pcy = deltas[:, 0] * aw_ + cx, deltas[:, 1] * ah_ + cy
        pw, ph = torch.exp(dw) * aw_, torch.exp(dh) * ah_
        boxes = torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
        order = logits.argsort(descending=True)[:pre]  # per-level pre-NMS top-k
        all_boxes.append(boxes[order]), all_logits.append(logits[order])
        all_lvl.append(torch.full((len(order),), lvl))
    boxes, logits, lvl = torch.cat(all_boxes), torch.cat(all_logits), torch.cat(all_lvl)
    boxes = torch.stack([boxes[:, 0].clamp(0, nw), boxes[:, 1].clamp(0, nh),
                         boxes[:, 2].clamp(0, nw), boxes[:, 3].clamp(0, nh)], 1)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    boxes, logits, lvl = boxes[keep], logits[keep], lvl[keep]
    keep = batched_nms(boxes, logits, lvl, nms)[:post]
    scale = torch.tensor([w / nw, h / nh, w / nw, h / nh])
    return boxes[keep] * scale, logits[keep]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip_file():
    return _clip_state()


@pytest.fixture(scope="module")
def fpn_file():
    return _rpn_state("fpn")


@pytest.fixture(scope="module")
def c4_file():
    return _rpn_state("c4", seed=1)


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, h // 8 + 1, w // 8 + 1, generator=g)
    img = F.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return (img * torch.tensor([1.0, 0.6, 0.3])[:, None, None] + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    return msg


# --------------------------------------------------------------------------------------- tests
def test_detect_kind(clip_file, fpn_file, c4_file):
    assert zoo.detect_kind(clip_file) == "regionclip-pretrained"
    assert zoo.detect_kind(_finetuned(clip_file)) == "regionclip-finetuned"
    assert zoo.detect_kind(fpn_file) == zoo.detect_kind(c4_file) == "rpn"
    assert zoo.detect_kind(torch.randn(3, 8)) == "concept-embeddings"
    assert zoo.detect_kind({"visual.conv1.weight": 0, "transformer.resblocks.0.ln_1.weight": 0}) == "open_clip"
    assert zoo.detect_kind({"rpn.head.cls_logits.weight": 0, "backbone.body.conv1.weight": 0}) == "torchvision-detector"
    assert zoo.detect_kind({"format": "regionclip/1"}) == "regionclip-checkpoint"
    assert zoo.detect_kind([1, 2]) == "unknown"


def test_clip_towers_equal_regionclip_reference(clip_file):
    clip_state, config = zoo.convert_clip(clip_file)
    assert zoo.clip_model_name(config) == TINY  # the QuickGELU twin, not TINY + "-gelu"
    model = zoo.build_clip(TINY, clip_state)
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor(100.0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model.encode_image(x), ref_image_tower(clip_file, x, heads=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"image tower differs:\n{m}")
    tokens = open_clip.get_tokenizer(TINY)(["a photo of a dog.", "itap of the traffic light."])
    with torch.no_grad():
        got, want = model.encode_text(tokens), ref_text_tower(clip_file, tokens, heads=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"text tower differs:\n{m}")


def test_text_tower_needs_quickgelu(clip_file):
    clip_state, _ = zoo.convert_clip(clip_file)
    with pytest.raises(BadConfig) as err:
        zoo.build_clip(TINY + "-gelu", clip_state)
    assert "QuickGELU" in _one_line(err)


@pytest.mark.parametrize("arch,kw", [
    ("RN50-quickgelu", dict(width=64, layers=(3, 4, 6, 3), embed=1024, grid=7, text_width=512, text_layers=12)),
    ("RN50x4-quickgelu", dict(width=80, layers=(4, 6, 10, 6), embed=640, grid=9, text_width=640, text_layers=12)),
])
def test_full_size_layouts_fit_open_clip(arch, kw):
    """Key names and shapes of full RN50 / RN50x4 RegionCLIP files against open_clip (meta tensors)."""
    clip_state, config = zoo.convert_clip(_clip_state(device="meta", **kw))
    assert zoo.clip_model_name(config) == arch
    target = open_clip.create_model(arch, pretrained=None, device="meta").state_dict()
    assert sorted(clip_state) == sorted(target)
    assert {k: tuple(v.shape) for k, v in clip_state.items()} == {k: tuple(v.shape) for k, v in target.items()}


@pytest.mark.parametrize("layout,size,nms,pre", [("fpn", (48, 72), 0.9, 1000), ("c4", (45, 68), 0.7, 6000)])
def test_rpn_proposals_equal_detectron2_reference(layout, size, nms, pre, fpn_file, c4_file, request):
    """The converted RPN through regionclip's ProposalStage gives detectron2's proposals.

    Sizes are chosen so that torchvision's own conventions would differ: the resized image is
    64x96 (FPN: P6 grid 1x2, stride 64 not 96 // 2; P2 has more anchors than the pre-NMS top-k)
    or 64x97 (C4: detectron2 rounds 96.7 up, torchvision floors; res4 width 7, stride 16 not 97 // 7).
    """
    from regionclip.proposals import ProposalStage

    state = fpn_file if layout == "fpn" else c4_file
    converted, got_layout = zoo.convert_rpn(state)
    assert got_layout == layout
    detector = zoo.build_rpn_detector(layout, converted)
    cfg = ProposalConfig(num_proposals=1000, pre_nms_top_n=pre, nms_threshold=nms, min_size=64, max_size=1333)
    stage = ProposalStage(detector, cfg).eval()
    image = _image(*size)
    # One thread, as in the xdist workers: with two, torchvision's convolutions and the reference's
    # sum in different orders, and a score near-tie at NMS 0.9 kept a neighbour box (IoU 0.9986).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            (boxes, objectness), = stage([image])
            ref_boxes, ref_logits = ref_proposals(state, image, layout, 64, 1333, nms, pre, 1000)
    finally:
        torch.set_num_threads(threads)
    assert len(ref_boxes) > 100, "reference gave too few proposals for a meaningful test"
    assert len(boxes) == len(ref_boxes), f"{len(boxes)} proposals, detectron2 gives {len(ref_boxes)}"
    # Match each detectron2 proposal to a box with IoU > 0.999 and the closest score (boxes
    # clipped to a corner can repeat across FPN levels).
    iou = box_iou(ref_boxes, boxes)
    assert float(iou.max(dim=1).values.min()) > 0.999, (
        f"a detectron2 proposal matched at IoU {float(iou.max(dim=1).values.min()):.4f} only")
    gap = (torch.sigmoid(ref_logits)[:, None] - objectness[None]).abs()
    idx = gap.masked_fill(iou <= 0.999, float("inf")).argmin(dim=1)
    assert len(set(idx.tolist())) == len(idx), "several detectron2 proposals matched the same box"
    torch.testing.assert_close(objectness[idx], torch.sigmoid(ref_logits), rtol=1e-4, atol=1e-5)
    # The same order, up to swaps of near-equal scores.
    assert (idx == torch.arange(len(idx))).float().mean() > 0.95


def test_rpn_copy_inside_a_regionclip_file(clip_file, c4_file):
    embedded = {**_finetuned(clip_file), **{"offline_" + k: v for k, v in c4_file.items()}}
    converted, layout = zoo.convert_rpn(embedded)
    direct, _ = zoo.convert_rpn(c4_file)
    assert layout == "c4" and converted.keys() == direct.keys()
    assert all(torch.equal(converted[k], direct[k]) for k in direct)
    assert torch.equal(direct["backbone.body.conv1.weight"], c4_file["backbone.stem.conv1.weight"].flip(1))


def test_concept_embeddings_load_and_score_as_regionclip(tmp_path):
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(5, 32, generator=g) * torch.rand(5, 1, generator=g) * 3  # un-normalised means
    path = tmp_path / "coco_5_cls_emb.pth"
    torch.save(raw, path)
    emb = zoo.load_concept_embeddings(path)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    labels = ["person", "dog", "hot dog", "traffic light", "cat"]
    assert zoo.check_concept_embeddings(emb, labels, embed_dim=32) is emb
    torch.save(raw[0], tmp_path / "one.pth")  # extract_concept_features squeezes a one-name file
    assert zoo.load_concept_embeddings(tmp_path / "one.pth").shape == (1, 32)

    # FastRCNNOutputLayers (use_clip_cls_emb, CLIPRes5ROIHeads) transcribed: weights as loaded from
    # the file, bias-free linear layers, zero frozen background, / CLSS_TEMP, softmax.
    feats = torch.randn(7, 32, generator=g) * 4  # attention-pool outputs
    cls_score = torch.nn.Linear(32, 5, bias=False)
    cls_bg_score = torch.nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        cls_score.weight.copy_(torch.load(path, weights_only=True))
        torch.nn.init.constant_(cls_bg_score.weight, 0)
        x = F.normalize(feats, p=2.0, dim=1)
        scores = torch.cat((x @ F.normalize(cls_score.weight, p=2.0, dim=1).t(), cls_bg_score(x)), dim=1) / 0.01
        want = F.softmax(scores, dim=-1)
    # The core's one scoring path: region_logits at scale 1 / CLSS_TEMP with a zero background.
    probs = region_logits(feats, emb, 1 / zoo.concepts.TEMPERATURE, background=True).softmax(dim=-1)
    torch.testing.assert_close(probs, want)
    # Zero-shot: (s * rpn_logit) ** 0.5; rows with a negative logit are NaN there and dropped.
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.2, 1.0, 0.0])
    fused = (want * logits[:, None]) ** 0.5
    valid = torch.isfinite(fused).all(dim=1)
    got = regionclip_scores(probs, logits)
    torch.testing.assert_close(got[valid], fused[valid][:, :-1])
    assert float(got[~valid].max()) == 0.0
    torch.testing.assert_close(regionclip_scores(probs), want[:, :-1])


def test_concept_embedding_errors(tmp_path):
    emb = torch.randn(65, 1024)
    with pytest.raises(BadInput) as err:
        zoo.check_concept_embeddings(emb, ["a"] * 80, embed_dim=1024)
    assert "65 embeddings but 80 labels" in _one_line(err)
    with pytest.raises(BadInput) as err:
        zoo.check_concept_embeddings(emb[:, :640], ["a"] * 65, embed_dim=1024)
    assert "dimension 640" in _one_line(err) and "1024" in str(err.value)
    torch.save({"weight": emb}, tmp_path / "dict.pth")
    with pytest.raises(WeightsUnavailable) as err:
        zoo.load_concept_embeddings(tmp_path / "dict.pth")
    assert "expected a concept-embedding tensor" in _one_line(err)
    torch.save(torch.randn(2, 3, 4), tmp_path / "cube.pth")
    with pytest.raises(WeightsUnavailable) as err:
        zoo.load_concept_embeddings(tmp_path / "cube.pth")
    assert "(N, D)" in _one_line(err) and "(2, 3, 4)" in str(err.value)
    with pytest.raises(WeightsUnavailable) as err:
        zoo.load_concept_embeddings(torch.zeros(3, 8))
    assert "row 0" in _one_line(err)


def test_regionclip_text_ensemble_is_the_raw_template_mean(clip_file):
    model = zoo.build_clip(TINY, zoo.convert_clip(clip_file)[0])
    tokenizer = open_clip.get_tokenizer(TINY)
    assert zoo.concepts.regionclip_prompts("hot dog,+bun", zoo.REGIONCLIP_TEMPLATES)[1] == "a photo of a hot dog bun."
    encoder = RegionCLIPTextEncoder(model.encode_text, tokenizer, zoo.REGIONCLIP_TEMPLATES, model_key="m",
                                    device=torch.device("cpu"))
    with torch.no_grad():
        got = encoder.embed(["dog", "traffic light"])
        want = model.encode_text(tokenizer([t.format("traffic light") for t in zoo.REGIONCLIP_TEMPLATES])).mean(0)
    assert len(zoo.REGIONCLIP_TEMPLATES) == 81
    # extract_concept_features.py's raw mean, up to the norm (RegionCLIP normalises rows when it scores)
    torch.testing.assert_close(got[1], F.normalize(want, dim=0))


def test_box_predictor_and_refinement(clip_file):
    state = _finetuned(clip_file)
    pred = zoo.box_predictor(state)
    assert pred["cls_score.weight"].shape == (48, 32) and pred["bbox_pred.weight"].shape == (4, 32)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 32, generator=g) * 5
    boxes = torch.tensor([[10.0, 20, 60, 90]]).repeat(6, 1) + torch.rand(6, 4, generator=g) * 5
    # detectron2 Box2BoxTransform((10, 10, 5, 5)).apply_deltas on the raw attention-pool output
    d = feats @ state["roi_heads.box_predictor.bbox_pred.weight"].T + state["roi_heads.box_predictor.bbox_pred.bias"]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    pcx, pcy = d[:, 0] / 10 * w + cx, d[:, 1] / 10 * h + cy
    pw = torch.exp((d[:, 2] / 5).clamp(max=math.log(1000 / 16))) * w
    ph = torch.exp((d[:, 3] / 5).clamp(max=math.log(1000 / 16))) * h
    want = torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
    head = BoxRefiner.from_state({k: pred[k] for k in ("bbox_pred.weight", "bbox_pred.bias")}, 32)
    huge = (10_000, 10_000)  # an image no box leaves: BoxRefiner.refine clips, detectron2's apply_deltas does not
    torch.testing.assert_close(head.refine(feats, boxes, huge), want.clamp(0, 10_000))
    bad = {k: v for k, v in state.items()}
    bad["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(4 * 48, 32)  # class-specific
    with pytest.raises(WeightsUnavailable) as err:
        zoo.box_predictor(bad)
    assert "class-agnostic" in _one_line(err)


def test_import_writes_checkpoint_and_preset(tmp_path, clip_file, fpn_file, c4_file):

    torch.save({"model": clip_file, "iteration": 1}, tmp_path / "regionclip_pretrained-cc_tiny.pth")
    torch.save({"model": fpn_file}, tmp_path / "rpn_lvis_866.pth")
    out = zoo.import_regionclip(tmp_path / "regionclip_pretrained-cc_tiny.pth", tmp_path / "rpn_lvis_866.pth",
                                tmp_path / "out", half=True)
    assert (out.recipe, out.clip_model, out.detector) == ("zero-shot", TINY, "detectron2_r50_fpn")
    assert out.preset.name == f"regionclip-{TINY}-cc.yaml"
    cfg = load_config(ModelConfig, out.preset)
    assert (cfg.clip_model, cfg.checkpoint, cfg.mode) == (TINY, str(out.checkpoint), "pool")
    assert (cfg.proposals.nms_threshold, cfg.proposals.num_proposals, cfg.scoring.background) == (0.9, 1000, True)
    assert len(cfg.text.templates) == 81
    assert "RegionCLIP zero-shot" in out.preset.read_text().splitlines()[0]

    ckpt = zoo.read_imported(out.checkpoint)
    assert ckpt["format"] == CHECKPOINT_FORMAT and zoo.detect_kind(ckpt) == "regionclip-checkpoint"
    assert ckpt["config"]["checkpoint"] == str(out.checkpoint) and "box_predictor" not in ckpt
    assert ckpt["detector"]["rpn.head.conv.0.0.weight"].dtype == torch.float16  # half=True
    clip = zoo.clip_tower.create_clip(ckpt["config"]["clip_model"])
    clip.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["clip"].items()})  # strict
    detector = zoo.build_rpn_detector(ckpt["config"]["detector"], {k: v.float() for k, v in ckpt["detector"].items()})
    assert ckpt["detector_layout"] == "fpn" and not detector.has_box_head

    # Fine-tuned: no text tower of its own, the RPN copy it carries (R50-C4), a box predictor.
    fine = {**_finetuned(clip_file), **{"offline_" + k: v for k, v in c4_file.items()}}
    torch.save({"model": fine}, tmp_path / "regionclip_finetuned-coco_tiny.pth")
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(tmp_path / "regionclip_finetuned-coco_tiny.pth",
                              tmp_path / "regionclip_finetuned-coco_tiny.pth", tmp_path / "out")
    assert "no text tower" in _one_line(err)
    out = zoo.import_regionclip(tmp_path / "regionclip_finetuned-coco_tiny.pth",
                                tmp_path / "regionclip_finetuned-coco_tiny.pth", tmp_path / "out",
                                text_from=tmp_path / "regionclip_pretrained-cc_tiny.pth")
    assert (out.recipe, out.detector, out.preset.stem) == ("finetuned-coco", "detectron2_r50_c4", f"regionclip-{TINY}-coco")
    ckpt = zoo.read_imported(out.checkpoint)
    assert ckpt["box_predictor"]["cls_bg_score.weight"].shape == (1, 32)
    assert ckpt["clip"]["visual.conv1.weight"].dtype == torch.float32
    cfg = yaml.safe_load(out.preset.read_text())
    assert cfg["proposals"]["pre_nms_top_n"] == 6000 and cfg["scoring"]["objectness_weight"] == 0.0


def test_wrong_files_give_one_clear_line(tmp_path, clip_file, fpn_file):
    good, rpn = tmp_path / "regionclip_pretrained-cc_tiny.pth", tmp_path / "rpn_lvis_866.pth"
    torch.save({"model": clip_file}, good)
    torch.save({"model": fpn_file}, rpn)
    out = tmp_path / "out"

    oc = tmp_path / "open_clip_model.bin"
    torch.save(zoo.clip_tower.create_clip(TINY).state_dict(), oc)
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(oc, rpn, out)
    assert "open_clip" in _one_line(err) and "expected a RegionCLIP" in str(err.value)

    tv = tmp_path / "fasterrcnn.pth"
    torch.save(zoo.convert_rpn(fpn_file)[0], tv)
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(good, tv, out)
    assert "torchvision Faster R-CNN" in _one_line(err) and "rpn_lvis_866.pth" in str(err.value)
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(rpn, rpn, out)
    assert "this is a detectron2 RPN" in _one_line(err) and "expected a RegionCLIP" in str(err.value)
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(good, oc, out)
    assert "open_clip" in _one_line(err) and "expected a detectron2 RPN" in str(err.value)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(truncated, rpn, out)
    assert "cannot be read" in _one_line(err)

    torch.save({"model": clip_file, "trainer": _TrainerState()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(tmp_path / "pickled.pth", rpn, out)
    assert "weights_only=True" in _one_line(err)

    partial = {k: v for k, v in clip_file.items() if k != "backbone.layer3.0.bn2.running_var"}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(WeightsUnavailable) as err:
        zoo.import_regionclip(tmp_path / "partial.pth", rpn, out)
    assert "missing 1 weight" in _one_line(err) and "backbone.layer3.0.bn2.running_var" in str(err.value)

    partial_rpn = {k: v for k, v in fpn_file.items() if k != "backbone.fpn_output3.bias"}
    with pytest.raises(WeightsUnavailable) as err:
        zoo.convert_rpn(partial_rpn, where="rpn_lvis_866.pth")
    assert "backbone.fpn_output3.bias" in _one_line(err)
    lsj = {**fpn_file, "proposal_generator.rpn_head.conv.conv0.weight": torch.zeros(1)}
    del lsj["proposal_generator.rpn_head.conv.weight"]
    with pytest.raises(WeightsUnavailable) as err:
        zoo.convert_rpn(lsj)
    assert "rpn_lvis_866_lsj" in _one_line(err)
    assert not out.exists()  # nothing is written before every part has loaded
