"""The launcher side: command lines that start a distributed job and the processes that run it."""
