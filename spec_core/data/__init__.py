"""Data: load + normalize conversations, chat templates, assistant-only loss masks, tokenization.

``conversation`` (Message, Conversation), ``load`` (load_conversations), ``templates`` (marker
registry), ``render`` (text + loss masks), ``tokenize`` (prepare_dataset, cached Arrow datasets).
"""

from spec_core.data.conversation import Conversation, InvalidRecord, Message
from spec_core.data.load import LoadResult, load_conversations
from spec_core.data.report import DataReport

__all__ = [
    "Conversation",
    "DataReport",
    "InvalidRecord",
    "LoadResult",
    "Message",
    "load_conversations",
]
