"""Hugging Face <-> Megatron checkpoint conversion, read top-down:

- `hf_to_megatron.py`, `megatron_to_hf.py`: the two directions (neither imports the other);
- `table.py`: every name on both sides, and every choice a Hugging Face checkpoint makes about names (`HFLayout`);
- `transforms.py`: how tensors reshape between the sides, each transform with its dtype policy;
- `megatron_keys.py`: the Megatron side's keys, shapes and dtypes, asked of the model's own `sharded_state_dict`;
- `record.py`: what an import keeps of its source so that the export writes it back exactly;
- `pipeline.py`: the path every tensor takes (parallel lanes, memory budget, NaN / Inf check, progress);
- `safetensors_files.py`, `torch_dist.py`: the two file formats, streamed;
- `file_bytes.py`: tensor bytes that already lie in a file, copied file to file by the kernel;
- `names.py`: the one owner of a parameter's checkpoint name (wrappers and adapters looked through);
- `output_dir.py`: output that appears only when complete (`../cli.py`: one `error:` line and exit code 2);
- `model_state.py`: the same table applied to live models in memory (tests, in-process loading).
"""
