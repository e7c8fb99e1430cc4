"""A tiny random Llama model folder with its own word-level tokenizer, written offline for the tests of
`sparsekit train --model` (no network: the tokenizer is trained on the given text)."""
from __future__ import annotations

from pathlib import Path

SPECIAL = ("<unk>", "<pad>", "<bos>", "<eos>")


def make_tiny_lm(folder: Path, text: str, seed: int = 0, hidden: int = 32, layers: int = 2,
                 random_norms: bool = False) -> Path:
    """folder <- config.json, model weights and tokenizer files of a random LlamaForCausalLM
    (hidden size `hidden`, `layers` layers) whose vocabulary is text's words plus SPECIAL.
    random_norms: every RMSNorm weight drawn from [0.5, 1.5] instead of ones (so folding the final
    norm into the unembedding changes which tokens a direction promotes)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=list(SPECIAL)))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = Path(folder)
    model = LlamaForCausalLM(config).eval()
    if random_norms:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.copy_(torch.rand_like(parameter) + 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
