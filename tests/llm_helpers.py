"""A tiny random Llama and an offline word-level tokenizer for the LLM and LoRA tests (nothing is downloaded)."""
import pytest
import torch

WORDS = [f"w{i}" for i in range(90)]
SPECIAL = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
VOCAB = {**SPECIAL, **{w: i + len(SPECIAL) for i, w in enumerate(WORDS)}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Autouse in each test module that imports it: tiny models run fastest on one thread, which also leaves the
    other cores to other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_process_group(tmp_path):
    """A torch.distributed group initialised by hand (as mp.spawn or a notebook does: no torchrun environment) that
    says it holds two processes; it holds this one only, so the code under test fails rather than hangs where it
    would run a collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dist, "get_world_size", lambda group=None: 2)
            yield
    finally:
        dist.destroy_process_group()


def tiny_llama(seed=0):
    """LlamaForCausalLM, hidden 64, 2 layers, vocab 94, float32, eval mode, seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=64, bos_token_id=2,
                         eos_token_id=3, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS that prepends <s>, with [PAD] as pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_llm(folder, seed=0):
    """Write the tiny model and its tokenizer to `folder` with save_pretrained; returns the folder."""
    tiny_llama(seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def random_texts(n, seed, words=WORDS, min_len=4, max_len=12):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=gen).tolist()) for k in lengths]


def id_batches(n_batches=3, batch=4, length=10, seed=0):
    """Tokenizer-free batches: {"input_ids"} only (every position labelled)."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(len(SPECIAL), len(VOCAB), (batch, length), generator=gen)}
            for _ in range(n_batches)]
