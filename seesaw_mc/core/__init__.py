"""The engine's core, torch-free: sequences, block managers with copy tickets, the scheduler
and its Seesaw policy, and the step plans the leader sends its replica."""
