"""The Discord adapter: cogs that turn Discord events into chat requests and render the answers.

Build the bot with `bot.discord.bot.SwitchboardBot(service, ...)` or run it with
`bot.discord.bot.run_bot(token, service, ...)`. Only this package imports `discord`.
"""
