"""The service layer: `ChatService` and the parts it orchestrates.

- `chat`: ChatService, the one place that decides how a message is answered;
- `conversations`: which conversation a message continues, and its history;
- `place_settings`: what applies where (model, system prompt, knowledge), and changes;
- `models`: the registry kept in step with models registered at run time;
- `limits`: how often one person may address the bot, and what their answers may cost;
- `feedback`: votes, corrections and the stats that sum them up;
- `compare`: models side by side and in blind battles, and the votes on them.

The answer unit itself ("run one model on these exact messages") is `chains.answer`.
"""

from bot.service.chat import STOPPED, ChatService

__all__ = ["STOPPED", "ChatService"]
