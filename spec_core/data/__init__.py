"""Data: load + normalize conversations, chat templates, assistant-only loss masks, tokenization.

``conversation`` (Message, Conversation), ``load`` (load_conversations), ``templates`` (marker
registry), ``render`` (text + loss masks), ``tokenize`` (prepare_dataset, cached Arrow datasets).
"""

from spec_core.data.conversation import Conversation, InvalidRecord, Message
from spec_core.data.load import LoadResult, load_conversations
from spec_core.data.render import ConversationRenderer, render_conversation
from spec_core.data.report import DataReport
from spec_core.data.tokenize import (
    PreparedData,
    dataset_cache_key,
    load_eval_conversations,
    load_tokenized,
    prepare_dataset,
)

__all__ = [
    "Conversation",
    "ConversationRenderer",
    "DataReport",
    "InvalidRecord",
    "LoadResult",
    "Message",
    "PreparedData",
    "dataset_cache_key",
    "load_conversations",
    "load_eval_conversations",
    "load_tokenized",
    "prepare_dataset",
    "render_conversation",
]
