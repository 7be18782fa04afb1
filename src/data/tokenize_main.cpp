// moetp_tokenize: text file -> byte-level token file (vocab 256). Regenerates data/kjv.tokens:
//   moetp_tokenize data/kjv.txt data/kjv.tokens
#include <cstdio>
#include <exception>

#include "data/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <text_path> <out_path>\n", argv[0]);
    return 2;
  }
  try {
    moetp::data::convert_text_file(argv[1], argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moetp_tokenize: %s\n", e.what());
    return 1;
  }
  return 0;
}
