"""What a person or a researcher reads after sessions: a session's report and closing summary, the
comparison of methods (`apa compare`) and its independent judge, the prior's own quality."""
