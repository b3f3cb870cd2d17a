"""The official T2T-ViT forward pass, written with PyTorch functional ops (optional torch).

It follows the official implementation line by line (PyTorch layouts: NCHW images, unfold in
channel-major order) and runs straight from an official state dict, so that a conversion can
be checked end to end without the official repository. It is checked against the golden
outputs of the official code in the tests. No dropout and no drop path (evaluation mode);
`official_logits` keeps the autograd graph, for gradient parity tests.
"""

import math


def official_forward(state_dict, images_nchw, num_heads, qk_scale=None):
    """Logits of the official model for normalized NCHW float32 images, as NumPy.

    Args:
        state_dict: `{name: array}` of an official checkpoint (unwrapped).
        images_nchw: float32 array `(batch, 3, side, side)`, already normalized.
        num_heads: backbone heads (not visible in the tensors).
        qk_scale: backbone attention scale; None means `head_dim ** -0.5`.
    """
    import torch

    with torch.no_grad():
        return official_logits(state_dict, images_nchw, num_heads, qk_scale).numpy()


def official_logits(state_dict, images_nchw, num_heads, qk_scale=None, attention=None):
    """As `official_forward`, as a torch tensor; torch tensors in `state_dict` are used as
    they are (with `requires_grad`, the logits carry their gradients).

    A dict passed as `attention` receives the attention of each layer as the official code
    forms it: `"t2t_1"`, `"t2t_2"` `(batch, T, T)` (the performer's made explicit:
    phi(q) phi(k)^T / (phi(q) . sum_t phi(k_t) + 1e-8)), `"block_i"` `(batch, heads, T, T)`.
    """
    attention = {} if attention is None else attention
    import torch
    import torch.nn.functional as F

    t = {
        k: v if torch.is_tensor(v) else torch.as_tensor(v, dtype=torch.float32)
        for k, v in state_dict.items()
    }

    def norm(x, p):
        return F.layer_norm(x, x.shape[-1:], t[f"{p}.weight"], t[f"{p}.bias"], eps=1e-5)

    def linear(x, p):
        return F.linear(x, t[f"{p}.weight"], t.get(f"{p}.bias"))

    def performer(x, p, name):
        emb = t[f"{p}.proj.weight"].shape[0]
        k, q, v = torch.split(linear(norm(x, f"{p}.norm1"), f"{p}.kqv"), emb, dim=-1)
        w = t[f"{p}.w"]
        m = w.shape[0]

        def prm_exp(u):
            xd = (u * u).sum(dim=-1, keepdim=True).repeat(1, 1, m) / 2
            return torch.exp(torch.einsum("bti,mi->btm", u, w) - xd) / math.sqrt(m)

        kp, qp = prm_exp(k), prm_exp(q)
        d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
        kptv = torch.einsum("bin,bim->bnm", v, kp)
        y = torch.einsum("bti,bni->btn", qp, kptv) / (d.repeat(1, 1, v.shape[-1]) + 1e-8)
        attention[name] = torch.einsum("bti,bsi->bts", qp, kp) / (d + 1e-8)
        y = v + linear(y, f"{p}.proj")
        return y + linear(F.gelu(linear(norm(y, f"{p}.norm2"), f"{p}.mlp.0")), f"{p}.mlp.2")

    def token_transformer(x, p, name):
        scale = x.shape[-1] ** -0.5  # the input width, as the official Token_transformer
        emb = t[f"{p}.attn.proj.weight"].shape[0]
        q, k, v = torch.split(linear(norm(x, f"{p}.norm1"), f"{p}.attn.qkv"), emb, dim=-1)
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attention[name] = attn
        y = v + linear(attn @ v, f"{p}.attn.proj")
        return y + linear(F.gelu(linear(norm(y, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")

    t2t_layer = performer if "tokens_to_token.attention1.w" in t else token_transformer

    def restructure(x):
        b, hw, c = x.shape
        side = int(math.isqrt(hw))
        return x.transpose(1, 2).reshape(b, c, side, side)

    x = torch.as_tensor(images_nchw, dtype=torch.float32)
    x = F.unfold(x, kernel_size=7, stride=4, padding=2).transpose(1, 2)
    x = restructure(t2t_layer(x, "tokens_to_token.attention1", "t2t_1"))
    x = F.unfold(x, kernel_size=3, stride=2, padding=1).transpose(1, 2)
    x = restructure(t2t_layer(x, "tokens_to_token.attention2", "t2t_2"))
    x = F.unfold(x, kernel_size=3, stride=2, padding=1).transpose(1, 2)
    x = linear(x, "tokens_to_token.project")
    x = torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + t["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}"
        b, n, c = x.shape
        head_dim = c // num_heads
        scale = qk_scale or head_dim**-0.5
        h = norm(x, f"{p}.norm1")
        qkv = linear(h, f"{p}.attn.qkv").reshape(b, n, 3, num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        attention[f"block_{i}"] = attn
        h = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + linear(h, f"{p}.attn.proj")
        h = linear(F.gelu(linear(norm(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        x = x + h
    x = norm(x, "norm")[:, 0]
    return linear(x, "head") if "head.weight" in t else x
