"""The agents that wire streams to tables and alerts, and the Faust app that hosts them."""
