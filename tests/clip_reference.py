"""An independent reference implementation of OpenAI's CLIP in plain torch, written
from the paper/README layout for the tests (not rsviewer's code, not open_clip's):
``nn.MultiheadAttention`` with ``in_proj_weight``, ``c_fc``/``c_proj`` MLPs, QuickGELU
or GELU, a ModifiedResNet with ``AttentionPool2d`` through ``F.multi_head_attention_forward``.
Its ``state_dict()`` is exactly the OpenAI/open_clip key layout."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, d, heads, act, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", act()), ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)
        self.mask = mask

    def forward(self, x):  # (L, B, D)
        m = self.mask.to(x.dtype) if self.mask is not None else None
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=m)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads, act, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(d, heads, act, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, size, patch, width, layers, heads, out, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        s = width**-0.5
        self.class_embedding = nn.Parameter(s * torch.randn(width))
        self.positional_embedding = nn.Parameter(s * torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(s * torch.randn(width, out))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    def __init__(self, inp, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inp, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inp != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inp, planes * 4, 1, bias=False)), ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        o = F.relu(self.bn2(self.conv2(o)))
        o = self.bn3(self.conv3(self.avgpool(o)))
        return F.relu(o + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    def __init__(self, grid, dim, heads, out):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)
        x = torch.cat([x.mean(0, keepdim=True), x]) + self.positional_embedding[:, None]
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return out[0]


class ModifiedResNet(nn.Module):
    def __init__(self, layers, width, out, heads, size):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self._inp = width
        self.layer1 = self._layer(width, layers[0])
        self.layer2 = self._layer(width * 2, layers[1], 2)
        self.layer3 = self._layer(width * 4, layers[2], 2)
        self.layer4 = self._layer(width * 8, layers[3], 2)
        self.attnpool = AttentionPool2d(size // 32, width * 32, heads, out)

    def _layer(self, planes, n, stride=1):
        mods = [Bottleneck(self._inp, planes, stride)]
        self._inp = planes * 4
        return nn.Sequential(*mods, *[Bottleneck(self._inp, planes) for _ in range(n - 1)])

    def forward(self, x):
        for c, b in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(b(c(x)))
        x = F.avg_pool2d(x, 2)
        return self.attnpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class RefCLIP(nn.Module):
    def __init__(self, embed=16, vision="vit", size=64, patch=16, vwidth=64, vlayers=2, vheads=2,
                 twidth=32, tlayers=2, theads=2, context=77, vocab=49408, act="quick_gelu", rn_layers=(1, 1, 1, 1)):
        super().__init__()
        A = QuickGELU if act == "quick_gelu" else nn.GELU
        if vision == "vit":
            self.visual = VisionTransformer(size, patch, vwidth, vlayers, vheads, embed, A)
        else:
            self.visual = ModifiedResNet(rn_layers, vwidth, embed, vheads, size)
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.transformer = Transformer(twidth, tlayers, theads, A, mask)
        self.token_embedding = nn.Embedding(vocab, twidth)
        self.positional_embedding = nn.Parameter(torch.randn(context, twidth) * 0.01)
        self.ln_final = nn.LayerNorm(twidth)
        self.text_projection = nn.Parameter(torch.randn(twidth, embed) * twidth**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))
        for p in self.parameters():  # LayerNorm/BN away from identity, so a wrong mapping shows
            if p.dim() == 1:
                p.data.add_(0.1 * torch.randn_like(p))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection
