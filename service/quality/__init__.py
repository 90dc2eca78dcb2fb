"""Quality: a task suite with right answers, and recipes that train members, a ranker and a fuser on it."""
