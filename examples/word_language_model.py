"""Word-level LSTM language model on the Declaration of Independence.

One script in two forms: ``examples/plain/word_language_model.py`` is plain PyTorch and
``examples/word_language_model.py`` its port to trainguard; ``diff -u`` them and every
changed line is the port. The port can be killed at any moment (Ctrl-C, SIGTERM,
kill -9) and rerun with the same command: it continues after its last commit, mid-epoch
included, and ends with the weights of an uninterrupted run, bit for bit. Afterwards,
``trainguard export runs/word_lm --best val_loss --mode min lm.safetensors`` writes the
best epoch's model as a plain state_dict.

The script is the classic word-level language model: a corpus tokenized into word ids
and batchified into columns, truncated backpropagation through time over ``bptt`` words
with the LSTM's hidden state carried from one batch to the next, plain SGD with gradient
clipping, ``args.lr`` divided by 4 whenever validation stops improving, the best model
saved and evaluated on the test split at the end. The text ships in the repository.

    python examples/word_language_model.py --epochs 6
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from trainguard.run import Run

parser = argparse.ArgumentParser(description="Word-level LSTM language model")
parser.add_argument("--data", default="examples/data/declaration.txt", help="a text file")
parser.add_argument("--emsize", type=int, default=64, help="size of word embeddings")
parser.add_argument("--nhid", type=int, default=64, help="hidden units per layer")
parser.add_argument("--nlayers", type=int, default=2, help="number of LSTM layers")
parser.add_argument("--lr", type=float, default=20.0, help="initial learning rate")
parser.add_argument("--clip", type=float, default=0.25, help="gradient clipping")
parser.add_argument("--epochs", type=int, default=6, help="upper epoch limit")
parser.add_argument("--batch-size", type=int, default=8, help="batch size")
parser.add_argument("--bptt", type=int, default=12, help="sequence length")
parser.add_argument("--dropout", type=float, default=0.2, help="dropout on layers")
parser.add_argument("--tied", action="store_true", help="tie the word embedding and softmax")
parser.add_argument("--seed", type=int, default=1111, help="random seed")
parser.add_argument("--log-interval", type=int, default=5, help="report interval")
parser.add_argument("--save-dir", default=os.environ.get("TRAINGUARD_RUN_DIR", "runs/word_lm"),
                    help="where the best model goes")
args = parser.parse_args()

torch.manual_seed(args.seed)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Dictionary:
    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


class Corpus:
    """Paragraphs of one text file: the first 80% train, then 10% valid, 10% test."""

    def __init__(self, path: str) -> None:
        self.dictionary = Dictionary()
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        cut, cut2 = len(lines) * 8 // 10, len(lines) * 9 // 10
        self.train = self.tokenize(lines[:cut])
        self.valid = self.tokenize(lines[cut:cut2])
        self.test = self.tokenize(lines[cut2:])

    def tokenize(self, lines: list[str]) -> torch.Tensor:
        ids = [self.dictionary.add_word(word) for line in lines
               for word in line.split() + ["<eos>"]]
        return torch.tensor(ids, dtype=torch.int64)


class RNNModel(nn.Module):
    """Embedding -> LSTM -> linear decoder, with dropout in between."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float,
                 tie_weights: bool = False) -> None:
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("--tied needs --nhid equal to --emsize")
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return nn.functional.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """Columns of consecutive words: row i holds word i of every column."""
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous().to(device)


def get_batch(source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(args.bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].view(-1)


def repackage_hidden(h):
    """Detach the hidden state from the history of the previous batch."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


corpus = Corpus(args.data)
eval_batch_size = 4
train_data = batchify(corpus.train, args.batch_size)
val_data = batchify(corpus.valid, eval_batch_size)
test_data = batchify(corpus.test, eval_batch_size)
ntokens = len(corpus.dictionary)
model = RNNModel(ntokens, args.emsize, args.nhid, args.nlayers, args.dropout,
                 args.tied).to(device)
criterion = nn.NLLLoss()


def evaluate(data_source: torch.Tensor) -> float:
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(eval_batch_size)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


def train(epoch: int) -> None:
    model.train()
    total_loss = 0.0
    start_time = time.time()
    hidden = run.carried("hidden", model.init_hidden(args.batch_size))
    for batch, i in run.enumerate(range(0, train_data.size(0) - 1, args.bptt)):
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        run.carry(hidden=hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-args.lr)
        total_loss += loss.item()
        if batch % args.log_interval == 0 and batch > 0:
            cur_loss = total_loss / args.log_interval
            elapsed = time.time() - start_time
            print(f"| epoch {epoch:3d} | batch {batch:4d} | lr {args.lr:7.4f} | "
                  f"ms/batch {elapsed * 1000 / args.log_interval:6.2f} | "
                  f"loss {cur_loss:5.2f} | ppl {math.exp(cur_loss):8.2f}", flush=True)
            total_loss = 0.0
            start_time = time.time()


def main() -> None:
    os.makedirs(args.save_dir, exist_ok=True)
    best_path = os.path.join(args.save_dir, "best.pt")
    best_val_loss = run.best("val_loss")
    for epoch in run.epochs(1, args.epochs + 1):
        epoch_start_time = time.time()
        train(epoch)
        val_loss = evaluate(val_data)
        run.log(val_loss=val_loss)
        print("-" * 80)
        print(f"| end of epoch {epoch:3d} | time: {time.time() - epoch_start_time:5.2f}s | "
              f"valid loss {val_loss:5.2f} | valid ppl {math.exp(val_loss):8.2f}", flush=True)
        print("-" * 80)
        if best_val_loss is None or val_loss < best_val_loss:
            torch.save(model.state_dict(), best_path)
            best_val_loss = val_loss
        else:
            args.lr /= 4.0  # no improvement on the validation set: anneal
    model.load_state_dict(torch.load(best_path, weights_only=True))
    test_loss = evaluate(test_data)
    print("=" * 80)
    print(f"| end of training | test loss {test_loss:5.2f} | test ppl {math.exp(test_loss):8.2f}")
    print("=" * 80)


if __name__ == "__main__":
    with Run(args.save_dir, save_every_steps=5) as run:
        run.track(model=model, args=args)
        main()
