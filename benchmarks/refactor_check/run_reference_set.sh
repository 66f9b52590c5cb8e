#!/bin/bash
# Behaviour-preserving refactors: run before and after the change into two folders, then compare_runs.sh A B.
# usage: baseline.sh OUTROOT  -- runs the reference set of analyses (fixtures + demo) into OUTROOT
set -u
out=$1; mkdir -p $out
cd "$(dirname "$0")/../.."
D=../shared/fixtures/data
F="--data_path $D/highlight_val_release.jsonl --v_feat_dirs $D/slowfast_features $D/clip_features --t_feat_dir $D/clip_text_features --a_feat_dir $D/pann_features --device cpu --overwrite"
export OMP_NUM_THREADS=1
python run_gate_analysis.py --model_path ../shared/fixtures/ckpt_custom_clipwise/model.ckpt $F --output_dir $out/clipwise_ext --contributions --ablate zero mean audio_swap --failure_cases 2 --compare_samples 5000 5003 > $out/clipwise_ext.log 2>&1; echo "clipwise_ext $?"
python run_gate_analysis.py --model_path ../shared/fixtures/ckpt_custom_global/model.ckpt $F --output_dir $out/global > $out/global.log 2>&1; echo "global $?"
python run_gate_analysis.py --model_path ../shared/fixtures/ckpt_avigate_legacy/model.ckpt $F --output_dir $out/legacy --legacy_model > $out/legacy.log 2>&1; echo "legacy $?"
python run_gate_analysis.py --model_path ../shared/fixtures/ckpt_v2_clipwise_film/model.ckpt $F --output_dir $out/v2film --ablate zero --contributions > $out/v2film.log 2>&1; echo "v2film $?"
python run_gate_analysis.py --model_path ../shared/fixtures/ckpt_ssm_diagstrip/model.ckpt $F --output_dir $out/ssm --batching original > $out/ssm.log 2>&1; echo "ssm $?"
python run_gate_analysis.py --demo --output_dir $out/demo --overwrite > $out/demo.log 2>&1; echo "demo $?"
