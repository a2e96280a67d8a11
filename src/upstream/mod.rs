//! Realtime voice APIs behind one seam: OpenAI Realtime first.
