"""nimu_rt: a real-time backend for paid Veo 3 video generation."""

__version__ = "0.1.0"
