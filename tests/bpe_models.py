"""A small Llama 3-style byte-level BPE tokenizer (tokenizer.json), trained here on the project's samples, and
the texts the tokenizer.json tests read."""
import json

from bailong.training import SAMPLES

TEXTS = ["The quick brown fox jumps over the lazy dog; 42 apples cost $3.50 (really).",
         "臺灣的夜市有蚵仔煎和滷肉飯，颱風天學校停課。", "😀🎉 𠮷野家 ㄅㄆㄇㄈ 龘 ∑∫ — ñandú façade",
         "Llama 3 把臺灣說成 three bytes 一個字, isn't it 奇怪?\n\n  indented\tand tabbed  "]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 3's pre-tokenizer split (words, 1-3 digits, punctuation runs, whitespace), then bytes as characters
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")


def bpe_folder(folder, vocab_size=700):
    """A small Llama 3-style tokenizer (byte-level BPE trained on the project's samples, <|begin_of_text|>
    added in front by its post-processor) with its tokenizer_config.json; returns the folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    samples = [(SAMPLES / f).read_text() for f in ("zh_tw_sample.txt", "en_sample.txt")]
    tk.train_from_iterator(samples, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder
