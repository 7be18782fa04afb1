#!/usr/bin/env bash
# End-to-end: the README's fine-tuning recipe at CPU scale, with the real Qwen3 tokenizer and chat
# template and a tiny model of Qwen3's vocabulary: chat JSONL -> `moetp tokenize --chat` (with a
# validation split) -> `moetp train` with a validation loss and a checkpoint -> `moetp convert` to
# a complete Hugging Face checkpoint (bf16 weights, tokenizer files, generation config) -> `moetp
# train --init-from-hf` from that export. Also: an interrupted
# or failing tokenize leaves no dataset, and resuming on a re-tokenized dataset is refused.
# Usage: chat_finetune.sh MOETP REPO [TOKENIZER_DIR]. Exits 77 (skipped) without the tokenizer.
set -euo pipefail
moetp=$(realpath "$1")
repo=$2
tok_dir=${3:-$repo/third_party/tokenizers/qwen3}
[ -f "$tok_dir/tokenizer.json" ] || { echo "no $tok_dir/tokenizer.json (scripts/fetch-tokenizer.sh): skipped"; exit 77; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# 60 conversations; some with a system turn, some with reasoning.
for i in $(seq 1 60); do
  sys=""
  [ $((i % 3)) -eq 0 ] && sys='{"role": "system", "content": "You answer in one line."}, '
  reason=""
  [ $((i % 4)) -eq 0 ] && reason=', "reasoning_content": "Add the two numbers."'
  echo "{\"messages\": [${sys}{\"role\": \"user\", \"content\": \"What is $i plus $((i * 3))?\"}, {\"role\": \"assistant\", \"content\": \"$i plus $((i * 3)) is $((i * 4)).\"${reason}}]}"
done > chats.jsonl

out=$("$moetp" tokenize --tokenizer "$tok_dir/tokenizer.json" --chat chats.jsonl --valid-fraction 0.2 --seed 1 --out sft 2>&1)
echo "$out"
grep -q "sft: 60 records" <<<"$out" || { echo "FAIL: no summary line"; exit 1; }
[ -f sft/manifest.json ] && [ -f sft/train-00000.ids ] && [ -f sft/train-00000.mask ] && [ -f sft/valid-00000.ids ] ||
  { echo "FAIL: dataset files missing"; ls sft; exit 1; }
grep -q '"loss_mask": true' sft/manifest.json || { echo "FAIL: manifest lacks loss_mask"; exit 1; }

# A failing run (a bad line) leaves no dataset behind, not even a partial folder.
{ cat chats.jsonl; echo '{"messages": [{"role": "robot", "content": "x"}]}'; } > bad.jsonl
if err=$("$moetp" tokenize --tokenizer "$tok_dir/tokenizer.json" --chat bad.jsonl --out bad 2>&1); then
  echo "FAIL: a bad record was accepted"; exit 1
fi
grep -q "bad.jsonl:61" <<<"$err" || { echo "FAIL: the error does not name bad.jsonl:61: $err"; exit 1; }
[ ! -e bad ] && [ -z "$(ls -d bad.partial-* 2>/dev/null)" ] || { echo "FAIL: a failed tokenize left files"; exit 1; }

# A tiny Qwen3-MoE with Qwen3's vocabulary.
sed 's/"vocab_size": 256/"vocab_size": 151936, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645/' \
  "$repo/configs/tiny-moe.json" > tiny-qwen3.json
common=(--set model.config=tiny-qwen3.json --set data.path=sft --set data.valid=sft --set train.seq_len=64
        --set train.global_batch_size=4 --set train.eval_every=2 --set train.device=cpu)
out=$("$moetp" train "${common[@]}" --set train.steps=4 --set checkpoint.every=4 --run-dir run1 2>&1)
echo "$out"
grep -q "^data: dataset sft (train split)" <<<"$out" || { echo "FAIL: no data line"; exit 1; }
grep -q "^validation: dataset sft (valid split)" <<<"$out" || { echo "FAIL: no validation line"; exit 1; }
grep -qE "^eval +4 \| valid loss [0-9]" <<<"$out" || { echo "FAIL: no validation loss at step 4"; exit 1; }
grep -q '"eval_loss"' run1/metrics.jsonl || { echo "FAIL: metrics.jsonl lacks eval_loss"; exit 1; }
grep -q '"loss_tokens"' run1/metrics.jsonl || { echo "FAIL: metrics.jsonl lacks loss_tokens"; exit 1; }

"$moetp" convert --from native --to hf run1/checkpoints/step-00000004 hf-export
# A complete Hugging Face folder: bf16 weights (the config's torch_dtype), the dataset's tokenizer
# files (carried by the checkpoint) and a generation config with the token ids.
for f in config.json tokenizer.json tokenizer_config.json generation_config.json; do
  [ -f "hf-export/$f" ] || { echo "FAIL: hf-export/$f missing"; ls hf-export; exit 1; }
done
grep -q '"eos_token_id": 151645' hf-export/generation_config.json || { echo "FAIL: generation_config lacks eos"; exit 1; }
"$moetp" inspect hf-export | grep -q "model.norm.weight  *BF16" || { echo "FAIL: weights not exported as BF16"; exit 1; }
out=$("$moetp" train "${common[@]}" --set train.steps=2 --init-from-hf hf-export --run-dir run2 2>&1)
echo "$out"
grep -q "initialised from Hugging Face checkpoint hf-export" <<<"$out" || { echo "FAIL: no init line"; exit 1; }
grep -qE "^eval +2 \| valid loss" <<<"$out" || { echo "FAIL: no validation loss after init"; exit 1; }

# The same sources tokenized again with another split are another dataset: resume refuses it.
"$moetp" tokenize --tokenizer "$tok_dir/tokenizer.json" --chat chats.jsonl --valid-fraction 0.3 --seed 1 --out sft --overwrite > /dev/null 2>&1
if err=$("$moetp" train "${common[@]}" --set train.steps=6 --resume run1/checkpoints/step-00000004 --run-dir run1 2>&1); then
  echo "FAIL: resumed on a changed dataset"; exit 1
fi
grep -q "trained on other data" <<<"$err" || { echo "FAIL: the refusal does not say why: $err"; exit 1; }
echo "e2e chat fine-tune: OK"
