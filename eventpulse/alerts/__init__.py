"""Alert rules, their lifecycle state machine, the durable outbox and Slack delivery.

The rules and the state machine are plain Python with no clock and no I/O of their own, so the
live worker and ``eventpulse replay`` run the very same code.
"""
