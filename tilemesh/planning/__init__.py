"""Planning: the planner and its cost model, pure functions of graph, device profiles and links."""
