"""The faust app and its agents: each module reads a topic, calls the pure core, writes a table
or a topic. Logic that decides anything lives in streamrec/, not here."""
