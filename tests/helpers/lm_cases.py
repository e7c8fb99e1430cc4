"""Shared by the LM tests: a tiny random-weight HookedTransformer, BOS-first token contexts and the
axis dictionary whose features are known (latent i = relu(x_i), latent d + i = relu(-x_i))."""
import torch

import sparsekit

D_VOCAB = 40


def tiny_transformer(n_layers: int, seed: int):
    """[n_layers] blocks, d_model 16, 2 heads, d_mlp 32, vocab 40, n_ctx 16, LayerNorm, eval mode."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=D_VOCAB,
                                  n_ctx=16, act_fn="gelu", normalization_type="LN", model_name="tiny-random",
                                  seed=seed)
    return HookedTransformer(cfg).eval()


def random_contexts(n: int, t: int, seed: int = 0):
    """[n, t] token ids in 1..39 with BOS (id 0) at position 0."""
    tokens = torch.randint(1, D_VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return tokens


def axis_dictionary(d: int, transcoder: bool = False):
    """ReLU dictionary with W_enc = [I, -I], W_dec = [I; -I], zero biases: relu(x) - relu(-x) = x exactly."""
    sae = (sparsekit.Transcoder(d, 2 * d, d, architecture="relu", l1_coeff=1.0) if transcoder
           else sparsekit.ReLUSAE(d, 2 * d, l1_coeff=1.0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
