"""Input pipeline: sources, tokenizers, chat templates, images, sequences (packing) and the Grain pipeline.

Entry points: `pipeline.make_train_iterator`, `pipeline.make_eval_examples`, `tokenizers.make_tokenizer`,
`bad_samples.BadSampleMonitor`; `python -m llava_jax.data.synthetic` writes the synthetic set to disk.
"""
