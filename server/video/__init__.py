"""Recorded-video analysis: fetch a video (URL or upload), sample frames at an interval,
run them through a `video` session whose clock is the video's own time, and report."""
