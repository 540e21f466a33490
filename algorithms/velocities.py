"""SAC Flow's velocity parameterisations (arXiv 2509.25756, section "velocity reparameterisation"): Flow-G (gated)
and Flow-T (decoded). Both implement ``fields.VelocityField``, so any flow algorithm can use them
(``flow.velocity: gated | decoded``); ``fields.MLPVelocity`` is the naive one they are compared with.

The K-step Euler rollout A_{i+1} = A_i + dt v(t_i, A_i, s) is a residual recurrent network; backpropagating through
it multiplies K Jacobians I + dt dv/dA, which explode or vanish like an RNN's. The two fields borrow the cures of
sequence models:

- Flow-G, a GRU-style gate (the paper's Flow-G update):
      g_i = sigmoid(z(t_i, A_i, s)),   v = g_i * (v_hat(t_i, A_i, s) - A_i),
  so that A_{i+1} = A_i + dt g_i * (v_hat - A_i) is a convex blend of A_i and the candidate v_hat for dt g_i <= 1:
  the step Jacobian is (1 - dt g) I + dt g dv_hat/dA plus the gate's derivative, close to a contraction. The gate
  network's last layer starts at weight 0 and bias ``gate_bias`` (the code's 5.0: g = sigmoid(5) = 0.993).
- Flow-T, a Transformer decoder per step (the paper's Flow-T update): an action token Phi_0 = W_a [A_i, emb(t_i)]
  and a state token Phi_s = MLP(s); each of L layers is
      Y = Phi + CrossAttn(LN(Phi), context LN(Phi_s)),   Phi = Y + FFN(LN(Y)),
  and v = W_o(LN(Phi_L)). Each step is decoded on its own: no attention across flow steps. With the one state
  token the paper describes, the attention weights are identically 1 (a softmax over one key), so the block adds
  a learned projection of the state token: the decoder's stability comes from the pre-LN residual stream and
  the normalised read-out, not from the attention pattern. The attention is still written in its general
  multi-head form (any number of context tokens), with plain linear maps so ``torch.func`` can differentiate it.

Choices the paper leaves open: the time embedding is the sinusoidal one of ``fields.TimeEmbedding`` fed directly
(the code adds a small MLP on top, which the first layer of each network subsumes); Flow-T's read-out W_o starts
at zero, so the initial policy is the base distribution pushed through the squashing map, like MLPVelocity's;
FFN width 4 d_model with GELU (the code's). Sizes default to the code's: hidden 512 for Flow-G's two networks
(``flow.hidden``), d_model 96, 4 heads, 2 layers for Flow-T.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from softflow.algorithms.fields import TimeEmbedding, VelocityField
from softflow.algorithms.networks import mlp

DEFAULT_GATE_BIAS = 5.0


class GatedVelocity(VelocityField):
    """Flow-G: v(x, t, s) = sigmoid(z([x, emb(t), s])) * (v_hat([x, emb(t), s]) - x), two SiLU MLPs."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], time_dim: int = 32,
                 gate_bias: float = DEFAULT_GATE_BIAS):
        super().__init__()
        self.act_dim = act_dim
        self.time = TimeEmbedding(time_dim)
        in_dim = act_dim + time_dim + obs_dim
        self.gate = mlp(in_dim, hidden, act_dim, activation=nn.SiLU)
        self.candidate = mlp(in_dim, hidden, act_dim, activation=nn.SiLU)
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.constant_(self.gate[-1].bias, gate_bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, self.time(t), obs], dim=-1)
        return torch.sigmoid(self.gate(h)) * (self.candidate(h) - x)


class CrossAttention(nn.Module):
    """Multi-head scaled dot-product attention of query tokens (B, n, d) to context tokens (B, m, d)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def split(z: torch.Tensor) -> torch.Tensor:  # (B, n, d) -> (B, heads, n, d / heads)
            return z.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.query(tokens)), split(self.key(context)), split(self.value(context))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out((weights @ v).transpose(1, 2).flatten(-2))


class DecoderLayer(nn.Module):
    """Y = Phi + CrossAttn(LN(Phi), LN(context)); Phi' = Y + FFN(LN(Y)) (pre-LN)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(d_model)
        self.norm_context = nn.LayerNorm(d_model)
        self.attention = CrossAttention(d_model, heads)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        y = tokens + self.attention(self.norm_tokens(tokens), self.norm_context(context))
        return y + self.ffn(self.norm_ffn(y))


class DecodedVelocity(VelocityField):
    """Flow-T: the action token [x, emb(t)] decoded against a state token by L pre-LN cross-attention layers;
    v = W_o(LN(Phi_L))."""

    def __init__(self, obs_dim: int, act_dim: int, d_model: int = 96, heads: int = 4, layers: int = 2,
                 time_dim: int = 32):
        super().__init__()
        self.act_dim = act_dim
        self.time = TimeEmbedding(time_dim)
        self.action_token = nn.Linear(act_dim + time_dim, d_model)
        self.state_token = mlp(obs_dim, [d_model], d_model, activation=nn.SiLU)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, act_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        tokens = self.action_token(torch.cat([x, self.time(t)], dim=-1)).unsqueeze(1)
        context = self.state_token(obs).unsqueeze(1)
        for layer in self.layers:
            tokens = layer(tokens, context)
        return self.out(self.norm_out(tokens[:, 0]))
